//! The admin protocol messages (`snowflock_proto::admin`) as the daemon
//! reads them from the CLI and as the CLI reads the answers, and the peer
//! requests (`snowflock_proto::peer`) as a daemon reads them from other
//! daemons. The input is a frame
//! payload; the first byte picks the type.
//!
//! Checked: what decodes round-trips (decode -> encode -> decode gives the
//! same value, and the encoding is stable).
#![no_main]

use libfuzzer_sys::fuzz_target;
use snowflock_fuzz::json_roundtrip;
use snowflock_proto::admin::{valid_vm_name, AdminRequest, AdminResponse, ExecInput};
use snowflock_proto::peer::PeerRequest;

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Some(
                AdminRequest::VmStart { name, .. }
                | AdminRequest::VmStop { name }
                | AdminRequest::Exec { name, .. },
            ) = json_roundtrip::<AdminRequest>(payload)
            {
                if valid_vm_name(&name) {
                    assert!(name.len() <= 48 && !name.contains(['/', '.', '\0']));
                }
            }
        }
        1 => {
            json_roundtrip::<AdminResponse>(payload);
        }
        2 => {
            json_roundtrip::<ExecInput>(payload);
        }
        _ => {
            if let Some(req) = json_roundtrip::<PeerRequest>(payload) {
                // A forwarded request carries exactly the user's request.
                if let Some(name) = req.vm_name() {
                    assert!(serde_json::to_vec(&req).is_ok(), "{name}");
                }
            }
        }
    }
});
