//! snowflock-descriptor
