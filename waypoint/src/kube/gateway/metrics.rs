//! The Gateway controller's Prometheus metrics (`/metrics` and `/stats/prometheus` on
//! `--metrics-addr`): how many Gateways of our class it serves, how its reconciles end, and
//! the errors of its watches, so an operator sees a controller that cannot do its job
//! without reading its log.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    watch: &'static str,
}

#[derive(Debug)]
pub(super) struct ControllerMetrics {
    registry: Registry,
    gateways: Gauge,
    retrying: Gauge,
    reconciles: Family<ResultLabels, Counter>,
    watch_errors: Family<WatchLabels, Counter>,
}

impl ControllerMetrics {
    pub(super) fn new() -> ControllerMetrics {
        let gateways = Gauge::default();
        let retrying = Gauge::default();
        let reconciles = Family::<ResultLabels, Counter>::default();
        let watch_errors = Family::<WatchLabels, Counter>::default();
        let mut registry = Registry::default();
        registry.register(
            "waypoint_controller_gateways",
            "Gateways of the controller's class it knows of",
            gateways.clone(),
        );
        registry.register(
            "waypoint_controller_retrying_gateways",
            "Gateways whose last reconcile failed, waiting to be tried again",
            retrying.clone(),
        );
        registry.register(
            "waypoint_controller_reconciles",
            "Reconciles of a Gateway of the controller's class, by result (ok, failed)",
            reconciles.clone(),
        );
        registry.register(
            "waypoint_controller_watch_errors",
            "Errors of the controller's watches on the API server, by watch",
            watch_errors.clone(),
        );
        ControllerMetrics {
            registry,
            gateways,
            retrying,
            reconciles,
            watch_errors,
        }
    }

    pub(super) fn gateways(&self, n: usize) {
        self.gateways.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(super) fn retrying(&self, n: usize) {
        self.retrying.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(super) fn reconciled(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// `watch`: `gateways`, `owned`, `rolebindings` or `gatewayclasses`.
    pub(super) fn watch_error(&self, watch: &'static str) {
        self.watch_errors
            .get_or_create(&WatchLabels { watch })
            .inc();
    }

    pub(super) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_encode_with_their_labels() {
        let m = ControllerMetrics::new();
        m.gateways(2);
        m.reconciled(true);
        m.reconciled(false);
        m.reconciled(false);
        m.watch_error("gateways");
        let text = m.encode();
        for line in [
            "waypoint_controller_gateways 2\n",
            "waypoint_controller_retrying_gateways 0\n",
            "waypoint_controller_reconciles_total{result=\"ok\"} 1\n",
            "waypoint_controller_reconciles_total{result=\"failed\"} 2\n",
            "waypoint_controller_watch_errors_total{watch=\"gateways\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
