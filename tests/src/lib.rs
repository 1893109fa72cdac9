//! snowflock-tests
