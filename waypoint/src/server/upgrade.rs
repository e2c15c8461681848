//! Protocol switches (HTTP/1.1 `Upgrade`, e.g. WebSocket): once the endpoint answers 101,
//! the client's and the endpoint's connections are joined and bytes copied both ways.

use http::Response;
use http::header::{self, HeaderValue};

use crate::upstream::Body;

/// An HTTP/1.1 request to switch protocols (WebSocket): what it asks for, and the future
/// of the client's side of the connection once the switch is answered.
pub(super) struct UpgradeRequest {
    pub(super) upgrade: HeaderValue,
    pub(super) client: hyper::upgrade::OnUpgrade,
}

/// When the endpoint agreed to switch protocols (101), joins the two upgraded connections
/// (client and endpoint) and copies bytes both ways until either side closes. The 101 keeps
/// its `Upgrade` and `Connection` headers.
pub(super) fn switch(
    mut response: Response<Body>,
    upgrade: Option<UpgradeRequest>,
) -> Response<Body> {
    let Some(upgrade) = upgrade else {
        return response;
    };
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let endpoint = hyper::upgrade::on(&mut response);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    tokio::spawn(async move {
        let (client, endpoint) = match tokio::join!(upgrade.client, endpoint) {
            (Ok(client), Ok(endpoint)) => (client, endpoint),
            (client, endpoint) => {
                let side = |r: &Result<_, hyper::Error>| match r {
                    Ok(_) => "switched".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::debug!(
                    client = side(&client),
                    endpoint = side(&endpoint),
                    "protocol switch abandoned"
                );
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut endpoint = hyper_util::rt::TokioIo::new(endpoint);
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut endpoint).await {
            tracing::debug!(%error, "upgraded connection ended");
        }
    });
    response
}
