//! dom0-memtap
