//! The guest API messages (`snowflock_proto::api`): requests the agent
//! reads from applications, answers the libraries read. The input is a
//! frame payload; the first byte picks the type.
//!
//! Checked: what decodes round-trips; a request that passes `validate`
//! has a clone count in range and a well-formed ticket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_fuzz::json_roundtrip;
use snowflock_proto::api::{
    valid_ticket_syntax, ApiRequest, ApiResponse, ChildStatus, MAX_CLONES_PER_TICKET,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let Some(r) = json_roundtrip::<ApiRequest>(payload) else {
                return;
            };
            if r.validate().is_ok() {
                match &r {
                    ApiRequest::RequestTicket { n, .. } => {
                        assert!((1..=MAX_CLONES_PER_TICKET).contains(n))
                    }
                    ApiRequest::Clone { ticket }
                    | ApiRequest::Join { ticket }
                    | ApiRequest::Kill { ticket } => {
                        assert!(valid_ticket_syntax(ticket));
                        assert!(ticket.len() <= 66 && ticket.is_ascii());
                    }
                    _ => {}
                }
            }
        }
        1 => {
            json_roundtrip::<ApiResponse>(payload);
        }
        _ => {
            json_roundtrip::<ChildStatus>(payload);
        }
    }
});
