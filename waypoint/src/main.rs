//! The waypoint L7 proxy. It arrives in the next phase (see the issues); this binary only says so.
fn main() {
    eprintln!("waypoint: not built yet; the node agent (ztunnel) comes first");
    std::process::exit(2);
}
