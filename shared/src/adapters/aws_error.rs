//! Classification of AWS SDK errors at the adapter edge: HTTP status, service error code and message
//! are kept, and throttling / 5xx / timeouts / connection failures are recognised as transient.
//!
//! Every AWS SDK crate re-exports the same `SdkError`, `HttpResponse` and `ProvideErrorMetadata` from
//! the smithy runtime, so one helper serves S3, SQS, DynamoDB and KMS.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// Service error codes that mean "try again later" whatever the HTTP status.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "SlowDown",
    "InternalError",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "KMSInternalException",
    "KeyUnavailableException",
    // KMS: request quota exceeded.
    "LimitExceededException",
];

/// A classified SDK failure.
#[derive(Debug, Clone)]
pub(crate) struct AwsFailure {
    /// HTTP status of a service error response.
    pub status: Option<u16>,
    /// Service error code (`NoSuchKey`, `ConditionalCheckFailedException`, …).
    pub code: Option<String>,
    /// Whether the same call may succeed later.
    pub transient: bool,
    /// `code: message (HTTP status)` or the error chain of a non-service failure.
    pub detail: String,
}

impl AwsFailure {
    /// Whether the service answered with this error code.
    pub fn has_code(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

/// Classify `err`, keeping its code and message.
pub(crate) fn classify<E>(err: &SdkError<E, HttpResponse>) -> AwsFailure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = err.code().map(str::to_string);
            let message = err.message().unwrap_or_default();
            let transient = status == 429
                || status >= 500
                || code.as_deref().is_some_and(|c| TRANSIENT_CODES.contains(&c));
            let detail = match &code {
                Some(code) if message.is_empty() => format!("{code} (HTTP {status})"),
                Some(code) => format!("{code}: {message} (HTTP {status})"),
                None if message.is_empty() => format!("HTTP {status}"),
                None => format!("{message} (HTTP {status})"),
            };
            AwsFailure {
                status: Some(status),
                code,
                transient,
                detail,
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => AwsFailure {
            status: None,
            code: None,
            transient: true,
            detail: DisplayErrorContext(err).to_string(),
        },
        _ => AwsFailure {
            status: None,
            code: None,
            transient: false,
            detail: DisplayErrorContext(err).to_string(),
        },
    }
}
