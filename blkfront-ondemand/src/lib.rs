//! blkfront-ondemand
