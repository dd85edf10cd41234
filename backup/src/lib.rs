//! Backup side: keeps the replica, watches heartbeats, fails over.
