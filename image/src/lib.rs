//! snowflock-image
