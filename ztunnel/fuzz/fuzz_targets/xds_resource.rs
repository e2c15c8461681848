//! Hostile xDS resources from the control plane. The first input byte chooses what the rest
//! is decoded as (protobuf, with prost):
//!
//! - 0: an `istio.workload.Address`, converted by `source::xds::convert::address`;
//! - 1: an `istio.security.Authorization`, converted by `convert::authorization`;
//! - 2: a whole `DeltaDiscoveryResponse`, applied to an xDS `Store` (with the mesh's two
//!   type URLs tried in turn), and the resulting `State` assembled.
//!
//! Decoding or conversion may fail; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use ztunnel::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use ztunnel::proto::istio::security as pbs;
use ztunnel::proto::istio::workload as pbw;
use ztunnel::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ztunnel::source::xds::{Store, convert};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(pb) = pbw::Address::decode(bytes) {
                report(convert::address("fuzz", pb, "cluster.local"));
            }
        }
        1 => {
            if let Ok(pb) = pbs::Authorization::decode(bytes) {
                report(convert::authorization(pb));
            }
        }
        _ => {
            let Ok(resp) = DeltaDiscoveryResponse::decode(bytes) else {
                return;
            };
            let mut store = Store::new("cluster.local").with_netns_dir("node-a", "/run/netns");
            // Once as sent, then as each type the client subscribes to.
            for type_url in [None, Some(ADDRESS_TYPE_URL), Some(AUTHORIZATION_TYPE_URL)] {
                let mut resp = resp.clone();
                if let Some(type_url) = type_url {
                    resp.type_url = type_url.to_owned();
                }
                let applied = store.apply(resp);
                let _ = applied.reply.encode_to_vec();
            }
            let (state, dropped) = store.state();
            drop((state, dropped));
        }
    }
});

fn report<T, E: std::fmt::Display>(result: Result<T, E>) {
    if let Err(error) = result {
        let _ = error.to_string();
    }
}
