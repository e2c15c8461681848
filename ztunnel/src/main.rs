fn main() { println!("{}", include_bytes!(concat!(env!("OUT_DIR"), "/ztunnel-capture")).len()); }
