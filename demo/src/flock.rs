//! The SnowFlock calls the demo makes, behind a trait so that tests can
//! stand in for the agent; [`Agent`] is the real API
//! ([`snowflock::client`]).

use snowflock::client::{self, ChildStatus, Identity, Ticket};

/// A SnowFlock call that failed.
#[derive(Debug, thiserror::Error)]
pub enum FlockError {
    /// The agent could not be reached, or it (or the host) refused.
    #[error(transparent)]
    Agent(#[from] client::SfError),
}

/// The SnowFlock calls the demo makes.
pub trait Flock {
    fn request_ticket(&self, n: u32) -> Result<Ticket, FlockError>;
    fn clone(&self, ticket: &str) -> Result<u32, FlockError>;
    /// Ends this clone. The real call never returns on success.
    fn exit(&self, status: i32) -> Result<(), FlockError>;
    fn join(&self, ticket: &str) -> Result<Vec<ChildStatus>, FlockError>;
    fn kill(&self, ticket: &str) -> Result<Vec<ChildStatus>, FlockError>;
    fn id(&self) -> Result<Identity, FlockError>;
}

/// The real API, through the agent socket.
pub struct Agent;

impl Flock for Agent {
    fn request_ticket(&self, n: u32) -> Result<Ticket, FlockError> {
        Ok(client::request_ticket(n)?)
    }
    fn clone(&self, ticket: &str) -> Result<u32, FlockError> {
        Ok(client::clone(ticket)?)
    }
    fn exit(&self, status: i32) -> Result<(), FlockError> {
        match client::exit(status) {
            Ok(never) => match never {},
            Err(e) => Err(e.into()),
        }
    }
    fn join(&self, ticket: &str) -> Result<Vec<ChildStatus>, FlockError> {
        Ok(client::join(ticket)?)
    }
    fn kill(&self, ticket: &str) -> Result<Vec<ChildStatus>, FlockError> {
        Ok(client::kill(ticket)?)
    }
    fn id(&self) -> Result<Identity, FlockError> {
        Ok(client::id()?)
    }
}
