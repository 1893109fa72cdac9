//! snowflockd
