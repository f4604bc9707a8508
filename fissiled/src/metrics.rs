//! `GET /metrics`: Prometheus (OpenMetrics text). Request latency by route template and
//! status, operation latency (create, exec, fork, merge, resume, snapshot, rollback, close)
//! by outcome, sandboxes by state and snapshotd's store figures (read at scrape time).
//! Labels never carry ids, so cardinality is bounded by the routes.

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ApiError;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~9 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
    operations: Family<OperationLabels, Histogram, fn() -> Histogram>,
    sandboxes: Family<StateLabels, Gauge>,
    store_raw_bytes: Gauge,
    store_pack_bytes: Gauge,
    store_snapshots: Gauge,
    image_bytes: Gauge,
    faults_served: Gauge,
    snapshotd_restarts: Gauge,
    pool_taken: Counter,
    standby_taken: Counter,
    trims: Counter,
    trimmed_pages: Counter,
    agent_connections_opened: Counter,
    dns_queries: Family<VerdictLabels, Counter>,
    proxy_connections: Family<VerdictLabels, Counter>,
    network: Family<NetworkLabels, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetworkLabels {
    counter: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let operations = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let sandboxes = Family::<StateLabels, Gauge>::default();
        let store_raw_bytes = Gauge::default();
        let store_pack_bytes = Gauge::default();
        let store_snapshots = Gauge::default();
        let image_bytes = Gauge::default();
        let faults_served = Gauge::default();
        let snapshotd_restarts = Gauge::default();
        let pool_taken = Counter::default();
        let standby_taken = Counter::default();
        let trims = Counter::default();
        let trimmed_pages = Counter::default();
        let agent_connections_opened = Counter::default();
        let dns_queries = Family::<VerdictLabels, Counter>::default();
        let proxy_connections = Family::<VerdictLabels, Counter>::default();
        let network = Family::<NetworkLabels, Gauge>::default();
        registry.register(
            "fissiled_http_request_duration_seconds",
            "HTTP requests until the response head, by route template and status",
            requests.clone(),
        );
        registry.register(
            "fissiled_operation_duration_seconds",
            "Sandbox operations (create, exec, fork, merge, resume, snapshot, rollback, close)",
            operations.clone(),
        );
        registry.register(
            "fissiled_sandboxes",
            "Sandboxes by state (standby: VMMs started ahead of time for fork children, no guest yet)",
            sandboxes.clone(),
        );
        registry.register(
            "fissiled_store_raw_bytes",
            "Raw bytes of all pages in snapshotd's store",
            store_raw_bytes.clone(),
        );
        registry.register(
            "fissiled_store_pack_bytes",
            "Bytes on disk in snapshotd's packs",
            store_pack_bytes.clone(),
        );
        registry.register(
            "fissiled_store_snapshots",
            "Durable snapshots in snapshotd's store",
            store_snapshots.clone(),
        );
        registry.register(
            "fissiled_store_image_bytes",
            "Memory of the snapshot images snapshotd holds open",
            image_bytes.clone(),
        );
        registry.register(
            "fissiled_store_faults_served",
            "Page faults snapshotd served since it started",
            faults_served.clone(),
        );
        registry.register(
            "fissiled_snapshotd_restarts",
            "Times snapshotd was started again after it exited (since this daemon started)",
            snapshotd_restarts.clone(),
        );
        registry.register(
            "fissiled_warm_pool_taken",
            "Creates served by a warm pool member",
            pool_taken.clone(),
        );
        registry.register(
            "fissiled_standby_taken",
            "Fork children, and sandboxes created from a snapshot or resumed, restored into a standby VMM (started ahead of time) instead of a new process",
            standby_taken.clone(),
        );
        registry.register(
            "fissiled_trims",
            "Idle sandboxes trimmed (--trim-after-s): their VMMs compared the guest pages they had copied with the snapshot image's",
            trims.clone(),
        );
        registry.register(
            "fissiled_trimmed_pages",
            "Guest pages (4 KiB) idle sandboxes gave back to their snapshot image because they held its bytes again",
            trimmed_pages.clone(),
        );
        registry.register(
            "fissiled_agent_connections_opened",
            "Agent connections opened for execs and commands because a sandbox had none idle (a started, forked, merged or rolled-back sandbox hands over the connection it woke its guest on)",
            agent_connections_opened.clone(),
        );
        registry.register(
            "fissiled_dns_queries",
            "Guests' DNS queries by verdict: forwarded, refused by the policy (denied_domain, not_allowed), malformed, upstream_failed, dropped (too many in flight)",
            dns_queries.clone(),
        );
        registry.register(
            "fissiled_proxy_connections",
            "Guests' HTTP and TLS connections through the domain proxy by verdict: allowed, refused (denied_domain, denied_address, always_denied, not_allowed, unresolved, no_name: plain HTTP naming no single host while the policy denies domains, too_many_headers), connect_failed, connection_cap, empty",
            proxy_connections.clone(),
        );
        registry.register(
            "fissiled_network",
            "What the running sandboxes' network rules counted, summed (read at scrape time): blocked_connections (by the policy), connection_cap_hits, rate_dropped_packets, rate_dropped_bytes",
            network.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            operations,
            sandboxes,
            store_raw_bytes,
            store_pack_bytes,
            store_snapshots,
            image_bytes,
            faults_served,
            snapshotd_restarts,
            pool_taken,
            standby_taken,
            trims,
            trimmed_pages,
            agent_connections_opened,
            dns_queries,
            proxy_connections,
            network,
        }
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Records one HTTP request.
    pub fn request(&self, method: &str, route: &str, status: u16, started: Instant) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts a create served by a warm pool member.
    pub fn pool_taken(&self) {
        self.pool_taken.inc();
    }

    /// Counts fork children, creates and resumes restored into standby VMMs.
    pub fn standby_taken(&self, n: usize) {
        self.standby_taken.inc_by(n as u64);
    }

    /// Counts a trim of an idle sandbox and the pages it gave back.
    pub fn trimmed(&self, pages: u64) {
        self.trims.inc();
        self.trimmed_pages.inc_by(pages);
    }

    /// Counts an agent connection opened because a sandbox's pool had none idle.
    pub fn agent_connection_opened(&self) {
        self.agent_connections_opened.inc();
    }

    /// Counts a guest's DNS query by what became of it.
    pub fn dns_query(&self, verdict: &'static str) {
        self.dns_queries
            .get_or_create(&VerdictLabels { verdict })
            .inc();
    }

    /// Counts a proxied connection by what became of it.
    pub fn proxy_connection(&self, verdict: &'static str) {
        self.proxy_connections
            .get_or_create(&VerdictLabels { verdict })
            .inc();
    }

    /// Records one operation.
    pub fn operation(&self, operation: &str, ok: bool, started: Instant) {
        self.operations
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
                outcome: if ok { "ok" } else { "error" }.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Runs `fut` as operation `operation`, recording its latency and outcome.
    pub async fn timed<T>(
        &self,
        operation: &str,
        fut: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let t0 = Instant::now();
        let r = fut.await;
        self.operation(operation, r.is_ok(), t0);
        r
    }

    /// The text exposition, with the scrape-time gauges set from `sandboxes` (state →
    /// count) and snapshotd's figures (if it answered).
    pub fn render(
        &self,
        sandboxes: &[(&str, u64)],
        store: Option<&fissile_snapshotd_client::client::DaemonStats>,
        network: &fissile_sandbox::net::egress::EgressCounters,
        snapshotd_restarts: u64,
    ) -> String {
        self.snapshotd_restarts.set(gauge_value(snapshotd_restarts));
        for (counter, v) in [
            ("blocked_connections", network.blocked_connections),
            ("connection_cap_hits", network.connection_cap_hits),
            ("rate_dropped_packets", network.rate_dropped_packets),
            ("rate_dropped_bytes", network.rate_dropped_bytes),
        ] {
            self.network
                .get_or_create(&NetworkLabels { counter })
                .set(gauge_value(v));
        }
        for (state, n) in sandboxes {
            self.sandboxes
                .get_or_create(&StateLabels {
                    state: (*state).to_string(),
                })
                .set(gauge_value(*n));
        }
        if let Some(s) = store {
            self.store_raw_bytes.set(gauge_value(s.raw_bytes));
            self.store_pack_bytes.set(gauge_value(s.pack_bytes));
            self.store_snapshots.set(gauge_value(s.snapshots));
            self.image_bytes.set(gauge_value(s.image_bytes));
            self.faults_served.set(gauge_value(s.faults_served));
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            out = format!("# encoding failed: {e}\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_requests_operations_and_gauges() {
        let m = Metrics::default();
        m.request("POST", "/v1/sandboxes/{id}/exec", 200, Instant::now());
        m.operation("fork", true, Instant::now());
        let net = fissile_sandbox::net::egress::EgressCounters {
            connection_cap_hits: 2,
            ..Default::default()
        };
        let text = m.render(&[("running", 3), ("lost", 1)], None, &net, 1);
        assert!(text.contains("fissiled_snapshotd_restarts 1"), "{text}");
        assert!(
            text.contains("fissiled_network{counter=\"connection_cap_hits\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "fissiled_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/sandboxes/{id}/exec\",status=\"200\"} 1"
        ), "{text}");
        assert!(
            text.contains(
                "fissiled_operation_duration_seconds_count{operation=\"fork\",outcome=\"ok\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("fissiled_sandboxes{state=\"running\"} 3"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
