//! The library half of the `twin` package: what the `twin` binary shares with the lab
//! (`twin-lab`, whose demo and bench drive `twin` processes): the control socket, server and
//! client (`control`), and the parsers of command-line values (`args`).

pub mod args;
pub mod control;
