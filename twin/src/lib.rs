//! The library half of the `twin` package: what the `twin` binary shares with the lab
//! (`twin-lab`, whose demo and bench drive `twin` processes): the control socket, server and
//! client (`control`), the parsers of command-line values (`args`) and the one way its
//! processes take termination signals (`signals`).

pub mod args;
pub mod clones;
pub mod control;
pub mod metrics;
pub mod signals;
