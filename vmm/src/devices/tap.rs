//! TAP network devices.
