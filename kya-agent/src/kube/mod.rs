//! This node's pods through the Kubernetes API (`[kubernetes]`): their
//! namespaces, names and containers' images for decisions ([`names`]), and
//! with `pod_selector` which pods match a label selector, and their
//! cgroups. The list and watch answers, label selectors and the pod uid →
//! cgroup mapping are in [`pods`] and [`selector`]; [`client`] fetches them
//! from the API server; the daemon's task that applies them to the
//! selection is in `crate::container_select`.

pub mod client;
pub mod names;
pub mod pods;
pub mod selector;

pub use pods::{pod_cgroups, selected_cgroups, Change, KubeError, PodIndex, PodView};
pub use selector::{LabelSelector, SelectorError};
