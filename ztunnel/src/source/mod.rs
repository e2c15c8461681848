//! Where the `State` comes from: the local YAML file (watched for changes) and, later, xDS.
//! A source only ever publishes a complete, validated `State`; a bad input never replaces a
//! good state.

pub mod local;
pub mod watch;

pub use local::{LocalConfigError, load};
pub use watch::{FileWatch, SourceStats, spawn_file_watch};
