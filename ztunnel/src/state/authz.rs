//! The L4 authorization verdict for a connection to a workload: DENY policies first, then
//! ALLOW policies (if any applies, one must match), else allow. This is the order Istio's
//! `AuthorizationPolicy` documents for L4 (CUSTOM is not supported in ztunnel). Dry-run
//! policies are evaluated by nobody here: they never change the verdict.

use std::fmt;

mod source;

pub use source::{NO_TRUSTED_FORWARDERS, policy_source};

use super::State;
use super::policy::{Action, Authorization, ConnectionInfo};
use super::workload::Workload;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `namespace/name` of the DENY policy that matched; `None` when no ALLOW matched.
        policy: Option<String>,
        reason: DenyReason,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy matched the connection.
    DenyPolicyMatched,
    /// ALLOW policies apply to the destination and none matched.
    NoAllowPolicyMatched,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::DenyPolicyMatched => "a DENY policy matched",
            DenyReason::NoAllowPolicyMatched => "ALLOW policies apply and none matched",
        })
    }
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        *self == Decision::Allow
    }
}

/// The verdict for `conn` to `dst`, from the policies `state` applies to `dst`.
pub fn authorize(conn: &ConnectionInfo, dst: &Workload, state: &State) -> Decision {
    let policies = state.policies_for(dst);
    decide(conn, policies.iter().map(|p| p.as_ref()))
}

/// The verdict from an already selected set of policies.
pub fn decide<'a>(
    conn: &ConnectionInfo,
    policies: impl IntoIterator<Item = &'a Authorization>,
) -> Decision {
    let enforced: Vec<&Authorization> = policies.into_iter().filter(|p| !p.dry_run).collect();
    if let Some(p) = enforced
        .iter()
        .find(|p| p.action == Action::Deny && p.matches(conn))
    {
        return Decision::Deny {
            policy: Some(p.key()),
            reason: DenyReason::DenyPolicyMatched,
        };
    }
    let mut allows = enforced
        .iter()
        .filter(|p| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|p| p.matches(conn)) {
        Decision::Allow
    } else {
        Decision::Deny {
            policy: None,
            reason: DenyReason::NoAllowPolicyMatched,
        }
    }
}

#[cfg(test)]
mod tests;
