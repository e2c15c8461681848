//! A path index over a service's routes, so that a request is tested only against routes
//! whose literal path condition it satisfies, in the original order (first match still
//! wins). A route whose blocks all require a literal path start (exact, prefix, segment
//! prefix) is filed under those literals in a byte trie; any other route is tried for every
//! path. Walking the request path down the trie gathers the candidate lists, already sorted
//! by route order, and a merge visits them in order. No allocation per request.

use super::matcher::{PathMatch, StrMatch};
use super::table::Route;

/// Below this many routes a plain scan is as fast.
pub(crate) const MIN_ROUTES: usize = 16;

/// At most this many candidate lists are merged; a path with more falls back to a scan.
const MAX_LISTS: usize = 16;

#[derive(Debug, Default, Clone)]
struct Node {
    /// (byte, child index), sorted by byte.
    children: Vec<(u8, u32)>,
    /// Routes with a literal ending here, in route order.
    routes: Vec<u32>,
}

#[derive(Debug, Clone)]
pub(crate) struct PathIndex {
    nodes: Vec<Node>,
    /// Routes that any path may match, in route order.
    always: Box<[u32]>,
}

/// Adds a non-empty list; `false` when there is no room.
fn push<'a>(lists: &mut [&'a [u32]; MAX_LISTS], n: &mut usize, l: &'a [u32]) -> bool {
    if l.is_empty() {
        return true;
    }
    if *n == MAX_LISTS {
        return false;
    }
    lists[*n] = l;
    *n += 1;
    true
}

/// The literal a path must start with for this block to match; `None` when there is none.
fn literal(p: &Option<PathMatch>) -> Option<&str> {
    match p.as_ref()? {
        PathMatch::Str(StrMatch::Exact(s) | StrMatch::Prefix(s)) => Some(s),
        PathMatch::Segments(s) => Some(s),
        PathMatch::Str(_) => None,
    }
}

impl PathIndex {
    pub(crate) fn build(routes: &[Route]) -> PathIndex {
        let mut nodes = vec![Node::default()];
        let mut always = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let live: Vec<_> = r.matches.iter().filter(|m| !m.never).collect();
            if r.matches.is_empty() {
                always.push(id);
                continue;
            }
            let literals: Option<Vec<&str>> = live.iter().map(|m| literal(&m.path)).collect();
            let Some(literals) = literals else {
                always.push(id);
                continue;
            };
            for lit in literals {
                let mut at = 0usize;
                for b in lit.bytes() {
                    at = match nodes[at].children.binary_search_by_key(&b, |(c, _)| *c) {
                        Ok(k) => nodes[at].children[k].1 as usize,
                        Err(k) => {
                            let next = nodes.len();
                            nodes.push(Node::default());
                            nodes[at].children.insert(k, (b, next as u32));
                            next
                        }
                    };
                }
                if nodes[at].routes.last() != Some(&id) {
                    nodes[at].routes.push(id);
                }
            }
        }
        PathIndex {
            nodes,
            always: always.into(),
        }
    }

    /// Calls `f` with each candidate route index in route order until it returns `Some`.
    /// `Err(())` when the path has too many candidate lists to merge here (scan instead).
    #[inline]
    pub(crate) fn first<T>(
        &self,
        path: &str,
        mut f: impl FnMut(usize) -> Option<T>,
    ) -> Result<Option<T>, ()> {
        let mut lists: [&[u32]; MAX_LISTS] = [&[]; MAX_LISTS];
        let mut n = 0;
        let mut ok = push(&mut lists, &mut n, &self.always)
            && push(&mut lists, &mut n, &self.nodes[0].routes);
        let mut at = 0usize;
        for b in path.bytes() {
            if !ok {
                break;
            }
            let node = &self.nodes[at];
            match node.children.binary_search_by_key(&b, |(c, _)| *c) {
                Ok(k) => {
                    at = node.children[k].1 as usize;
                    ok = push(&mut lists, &mut n, &self.nodes[at].routes);
                }
                Err(_) => break,
            }
        }
        if !ok {
            return Err(());
        }
        let lists = &mut lists[..n];
        loop {
            // The smallest head among the lists: the next route in order.
            let mut best: Option<u32> = None;
            for l in lists.iter() {
                if let Some(&h) = l.first()
                    && best.is_none_or(|b| h < b)
                {
                    best = Some(h);
                }
            }
            let Some(id) = best else {
                return Ok(None);
            };
            // Skip this id in every list that has it at the head (a route filed twice).
            for l in lists.iter_mut() {
                if l.first() == Some(&id) {
                    *l = &l[1..];
                }
            }
            if let Some(t) = f(id as usize) {
                return Ok(Some(t));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::HeaderMap;

    use super::*;
    use crate::route::matcher::{RouteMatch, full_match_regex};
    use crate::route::request::Request;
    use crate::route::table::{
        Action, Decision, Policy, RouteId, RouteSource, ServiceRoutes, Target,
    };

    fn route(i: usize, blocks: Vec<RouteMatch>) -> Route {
        Route {
            matches: blocks.into(),
            target: Arc::new(Target {
                id: RouteId {
                    resource: Default::default(),
                    rule: i,
                    name: None,
                },
                action: Action::Fail {
                    status: 500,
                    reason: "test",
                },
                policy: Policy::default(),
            }),
        }
    }

    fn block(path: Option<PathMatch>, never: bool) -> RouteMatch {
        RouteMatch {
            path,
            never,
            ..RouteMatch::default()
        }
    }

    fn chosen(d: Decision<'_>) -> Option<usize> {
        match d {
            Decision::Matched { target, .. } => Some(target.id.rule),
            _ => None,
        }
    }

    /// A deterministic mix of every kind of path condition, compared with a plain scan on
    /// paths made of the same pieces.
    #[test]
    fn the_index_chooses_what_a_scan_chooses() {
        let pieces = [
            "/", "/a", "/a/", "/ab", "/a/b", "/b", "/b/c/d", "/abc", "/a/b/c", "",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..50 {
            let mut routes = Vec::new();
            for i in 0..40 {
                let mut blocks = Vec::new();
                for _ in 0..(next(3)) {
                    let p = pieces[next(pieces.len())];
                    let path = match next(7) {
                        0 => Some(PathMatch::Str(StrMatch::Exact(p.into()))),
                        1 | 2 => Some(PathMatch::Str(StrMatch::Prefix(p.into()))),
                        3 | 4 => Some(PathMatch::segments(p)),
                        5 => Some(PathMatch::Str(StrMatch::Regex(
                            full_match_regex(&format!("{}.*", regex::escape(p))).expect("valid"),
                        ))),
                        _ => None,
                    };
                    blocks.push(block(path, next(10) == 0));
                }
                routes.push(route(i, blocks));
            }
            let sr = ServiceRoutes::new(routes, RouteSource::VirtualService);
            let h = HeaderMap::new();
            for a in pieces {
                for b in pieces {
                    let path = format!("{a}{b}");
                    let req = Request::get(&path, &h, 80);
                    assert_eq!(
                        chosen(sr.decide(&req)),
                        chosen(sr.scan(&req)),
                        "round {round}, path {path:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn literal_routes_are_filed_and_others_always_tried() {
        let routes = vec![
            route(
                0,
                vec![block(
                    Some(PathMatch::Str(StrMatch::Prefix("/api".into()))),
                    false,
                )],
            ),
            route(1, vec![block(None, false)]),
            route(
                2,
                vec![block(
                    Some(PathMatch::Str(StrMatch::Exact("/api/x".into()))),
                    false,
                )],
            ),
            route(3, vec![]),
        ];
        let ix = PathIndex::build(&routes);
        assert_eq!(&*ix.always, [1, 3]);
        let mut seen = Vec::new();
        let r: Result<Option<()>, ()> = ix.first("/api/x", |i| {
            seen.push(i);
            None
        });
        assert_eq!(r, Ok(None));
        assert_eq!(seen, [0, 1, 2, 3], "in route order");
        seen.clear();
        let _ = ix.first("/other", |i| {
            seen.push(i);
            None::<()>
        });
        assert_eq!(seen, [1, 3]);
    }
}
