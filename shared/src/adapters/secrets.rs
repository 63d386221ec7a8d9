//! Secrets resolved once at cold start: plain in local stacks, from Secrets Manager when deployed —
//! the OAuth client secret (`MAPILLARY_CLIENT_SECRET_ARN`) and the poller's activity-feed token
//! (`MAPILLARY_FEED_TOKEN_SECRET_ARN`).

use secrecy::SecretString;

use crate::config::ClientSecretSource;

/// A secret could not be read. The message names the variable, never the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Secrets Manager failed (permissions, missing secret, network).
    #[error("reading {name}: {message}")]
    Read {
        /// The variable that holds the ARN.
        name: &'static str,
        /// What Secrets Manager said.
        message: String,
    },
    /// The secret exists but has no string value (binary secrets are not supported).
    #[error("{name}: the secret has no string value")]
    NotAString {
        /// The variable that holds the ARN.
        name: &'static str,
    },
}

/// The client secret `source` names, reading Secrets Manager through `sdk` when it is an ARN.
pub async fn resolve_client_secret(
    source: ClientSecretSource,
    sdk: &aws_config::SdkConfig,
) -> Result<SecretString, SecretError> {
    resolve_secret(source, "MAPILLARY_CLIENT_SECRET_ARN", sdk).await
}

/// The secret `source` names, reading Secrets Manager through `sdk` when it is an ARN; `arn_var`
/// (the variable that held the ARN) is what errors name.
pub async fn resolve_secret(
    source: ClientSecretSource,
    arn_var: &'static str,
    sdk: &aws_config::SdkConfig,
) -> Result<SecretString, SecretError> {
    match source {
        ClientSecretSource::Plain(s) => Ok(s),
        ClientSecretSource::SecretArn(arn) => {
            let out = aws_sdk_secretsmanager::Client::new(sdk)
                .get_secret_value()
                .secret_id(&arn)
                .send()
                .await
                .map_err(|e| SecretError::Read {
                    name: arn_var,
                    message: aws_sdk_secretsmanager::error::DisplayErrorContext(e).to_string(),
                })?;
            let s = out
                .secret_string()
                .ok_or(SecretError::NotAString { name: arn_var })?;
            Ok(SecretString::from(s.to_string()))
        }
    }
}
