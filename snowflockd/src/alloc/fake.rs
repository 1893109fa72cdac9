//! A scripted allocator for unit tests: answers offers from a queue and
//! records what the daemon asked of it.

use super::{AllocError, Allocator, Offer, Want};
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use std::collections::VecDeque;

#[derive(Default)]
pub struct FakeAlloc {
    /// Answers to the next offers, in order (then: nothing anywhere).
    pub answers: Mutex<VecDeque<Result<Offer, AllocError>>>,
    /// `Want::most` of each offer asked for.
    pub asked: Mutex<Vec<u32>>,
    /// Tickets released one by one.
    pub released: Mutex<Vec<String>>,
}

impl FakeAlloc {
    pub fn answer(&self, a: Result<Offer, AllocError>) {
        self.answers.lock().push_back(a);
    }
}

impl Allocator for FakeAlloc {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn offer<'a>(&'a self, want: Want<'a>) -> BoxFuture<'a, Result<Offer, AllocError>> {
        self.asked.lock().push(want.most);
        let a = self.answers.lock().pop_front().unwrap_or(Ok(Offer {
            hosts: Vec::new(),
            here: 0,
        }));
        async move { a }.boxed()
    }

    fn release<'a>(&'a self, ticket: &'a str) -> BoxFuture<'a, ()> {
        self.released.lock().push(ticket.to_string());
        async {}.boxed()
    }
}
