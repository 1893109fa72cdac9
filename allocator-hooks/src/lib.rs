//! allocator-hooks
