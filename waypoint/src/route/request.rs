//! The parts of a request that routing reads, borrowed from wherever the server keeps them.

use std::collections::BTreeMap;

use http::HeaderMap;

/// The client workload, as the waypoint knows it from the HBONE peer identity and the
/// workload state: its namespace and pod labels (for `sourceNamespace`, `sourceLabels`).
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl Source<'_> {
    /// A client the waypoint knows nothing about.
    pub const UNKNOWN: Source<'static> = Source {
        namespace: "",
        labels: &NO_LABELS,
    };
}

/// A request as routing sees it. Nothing is copied: the server passes what hyper parsed.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `GET`, `POST`, ... as sent.
    pub method: &'a str,
    /// `http` or `https` (the scheme the client used inside the tunnel).
    pub scheme: &'a str,
    /// `:authority` or `Host`, as sent (`reviews:9080`).
    pub authority: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// What follows `?`, or empty.
    pub query: &'a str,
    /// Header names are lowercase in `http::HeaderMap`.
    pub headers: &'a HeaderMap,
    /// The service port the client connected to (the HBONE CONNECT authority's port).
    pub port: u16,
    pub source: Source<'a>,
}

impl<'a> Request<'a> {
    /// A GET of `path_and_query` on `port` with the given headers (tests and benchmarks).
    pub fn get(path_and_query: &'a str, headers: &'a HeaderMap, port: u16) -> Request<'a> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        Request {
            method: "GET",
            scheme: "http",
            authority: "",
            path,
            query,
            headers,
            port,
            source: Source::UNKNOWN,
        }
    }
}
