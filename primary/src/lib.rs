//! Primary side: runs the protected VM and streams epoch checkpoints.
