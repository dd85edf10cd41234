//! End-to-end and fault-injection tests: network namespaces, TAPs, real processes.
