//! snowflock-cli
