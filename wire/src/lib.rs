//! Replication wire protocol between primary and backup.
