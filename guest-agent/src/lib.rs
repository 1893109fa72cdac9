//! snowflock-guest
