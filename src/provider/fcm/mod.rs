//! FCM HTTP v1 provider (being written).

use std::sync::Arc;

use crate::config::{ConfigError, FcmConfig};
use crate::provider::Provider;

/// Builds the FCM provider of one app.
pub fn build(key: &str, _config: &FcmConfig) -> Result<Arc<dyn Provider>, ConfigError> {
    Err(ConfigError::Invalid {
        key: key.to_string(),
        reason: "FCM support is not built yet".into(),
    })
}
