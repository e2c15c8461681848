//! Request routing: a compiled, immutable route table per config, and request matching as a
//! pure function over a borrowed request view.
//!
//! `compile` turns validated resources (VirtualService, HTTPRoute, DestinationRule subsets)
//! into a `RouteTable`: per service host, routes in the order they are tried, with matchers
//! compiled once (anchored regexes, parsed header names) and per-route policy as data.
//! `RouteTable::decide` picks the route for a request; `Backends::pick` picks a weighted
//! destination from a random number. Nothing here does I/O or allocates per request (a
//! header sent several times is the one exception: its values are joined to be matched).

pub mod compile;
mod compile_gateway;
mod compile_istio;
pub mod hosts;
mod index;
pub mod matcher;
pub mod request;
pub mod table;

pub use compile::{CompileOptions, Compiled, compile};
pub use request::{Request, Source};
pub use table::{Action, Backend, Backends, Decision, Policy, Route, RouteTable, Target};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_export;
#[cfg(test)]
mod tests_gateway;
