//! The OAuth client secret, resolved once at cold start: plain in local stacks, from Secrets Manager
//! (`MAPILLARY_CLIENT_SECRET_ARN`) when deployed.

use secrecy::SecretString;

use crate::config::ClientSecretSource;

/// The client secret could not be read. The message never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Secrets Manager failed (permissions, missing secret, network).
    #[error("reading MAPILLARY_CLIENT_SECRET_ARN: {0}")]
    Read(String),
    /// The secret exists but has no string value (binary secrets are not supported).
    #[error("MAPILLARY_CLIENT_SECRET_ARN: the secret has no string value")]
    NotAString,
}

/// The secret `source` names, reading Secrets Manager through `sdk` when it is an ARN.
pub async fn resolve_client_secret(
    source: ClientSecretSource,
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
                .map_err(|e| {
                    SecretError::Read(aws_sdk_secretsmanager::error::DisplayErrorContext(e).to_string())
                })?;
            let s = out.secret_string().ok_or(SecretError::NotAString)?;
            Ok(SecretString::from(s.to_string()))
        }
    }
}
