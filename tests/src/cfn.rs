//! The four CloudFormation calls the local stack makes (CreateStack, DescribeStacks, ListStackResources,
//! DeleteStack), as Query-protocol requests to moto.
//!
//! Why not `aws-sdk-cloudformation`: only this harness used it, and it was the largest crate of a first
//! build after aws-sdk-s3 (33.8 CPU-s at opt-level 0). Nothing else waits for it, so cargo compiled it
//! last, and xtask's own compile waited for it at the very end of the build, on one core
//! (`docs/benchmarks.md`, "First run and CI"). These calls only ever go to moto. Like the Lambda calls of
//! [`crate::stack::disable_moto_event_source_mappings`], they carry an unsigned `Authorization` header
//! ([`crate::stack::moto_authorization`]). Replies are parsed with the SDK's own XML decoder (`aws-smithy-xml`).

use anyhow::{anyhow, bail, Context, Result};
use aws_smithy_xml::decode::{try_data, Document, ScopedDecoder};

use crate::stack::moto_authorization;

/// The CloudFormation API version the Query protocol names in every request.
const VERSION: &str = "2010-05-15";
/// Most characters of an error reply quoted in an error.
const MAX_QUOTED: usize = 2000;

/// A CloudFormation endpoint (moto's).
#[derive(Debug, Clone)]
pub struct Cfn {
    http: reqwest::Client,
    endpoint: String,
}

/// What DescribeStacks says of one stack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackDescription {
    /// `StackStatus`, e.g. `CREATE_COMPLETE`.
    pub status: String,
    /// `StackStatusReason`, when given.
    pub reason: Option<String>,
    /// `Outputs`: (key, value), in reply order.
    pub outputs: Vec<(String, String)>,
}

/// One entry of ListStackResources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceSummary {
    pub logical_id: String,
    pub physical_id: Option<String>,
    pub resource_type: String,
}

impl Cfn {
    pub fn new(endpoint: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
        }
    }

    /// One Query-protocol call; the reply's body when it succeeded.
    async fn call(&self, action: &str, params: &[(String, String)]) -> Result<String> {
        let mut form: Vec<(&str, &str)> = vec![("Action", action), ("Version", VERSION)];
        form.extend(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let reply = self
            .http
            .post(format!("{}/", self.endpoint))
            .header(
                reqwest::header::AUTHORIZATION,
                moto_authorization("cloudformation"),
            )
            .form(&form)
            .send()
            .await
            .with_context(|| format!("{action} (moto CloudFormation)"))?;
        let status = reply.status();
        let body = reply
            .text()
            .await
            .with_context(|| format!("{action} (moto CloudFormation): reply"))?;
        if !status.is_success() {
            let said = error_message(&body).unwrap_or_else(|| body.chars().take(MAX_QUOTED).collect());
            bail!("{action} (moto CloudFormation): {status}: {said}");
        }
        Ok(body)
    }

    /// CreateStack with `parameters` and `capabilities`.
    pub async fn create_stack(
        &self,
        stack_name: &str,
        template_body: &str,
        parameters: &[(&str, String)],
        capabilities: &[&str],
    ) -> Result<()> {
        let mut params = vec![
            ("StackName".to_string(), stack_name.to_string()),
            ("TemplateBody".to_string(), template_body.to_string()),
        ];
        for (i, (k, v)) in parameters.iter().enumerate() {
            params.push((format!("Parameters.member.{}.ParameterKey", i + 1), k.to_string()));
            params.push((format!("Parameters.member.{}.ParameterValue", i + 1), v.clone()));
        }
        for (i, c) in capabilities.iter().enumerate() {
            params.push((format!("Capabilities.member.{}", i + 1), c.to_string()));
        }
        self.call("CreateStack", &params).await.map(drop)
    }

    /// DescribeStacks of one stack: `None` when the reply lists none.
    pub async fn describe_stack(&self, stack_name: &str) -> Result<Option<StackDescription>> {
        let body = self
            .call("DescribeStacks", &[("StackName".into(), stack_name.into())])
            .await?;
        parse_describe_stacks(&body).context("DescribeStacks (moto CloudFormation): reply")
    }

    /// Every page of ListStackResources.
    pub async fn list_stack_resources(&self, stack_name: &str) -> Result<Vec<ResourceSummary>> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut params = vec![("StackName".to_string(), stack_name.to_string())];
            if let Some(token) = next.take() {
                params.push(("NextToken".to_string(), token));
            }
            let body = self.call("ListStackResources", &params).await?;
            let (page, token) = parse_list_stack_resources(&body)
                .context("ListStackResources (moto CloudFormation): reply")?;
            out.extend(page);
            match token {
                Some(t) if !t.is_empty() => next = Some(t),
                _ => return Ok(out),
            }
        }
    }

    /// DeleteStack.
    pub async fn delete_stack(&self, stack_name: &str) -> Result<()> {
        self.call("DeleteStack", &[("StackName".into(), stack_name.into())])
            .await
            .map(drop)
    }
}

/// The text content of `el`.
fn text(el: &mut ScopedDecoder<'_, '_>) -> Result<String> {
    Ok(try_data(el).map_err(|e| anyhow!("{e}"))?.into_owned())
}

/// Calls `each` for every child element of `el` whose local name is `name`.
fn children(
    el: &mut ScopedDecoder<'_, '_>,
    name: &str,
    mut each: impl FnMut(&mut ScopedDecoder<'_, '_>) -> Result<()>,
) -> Result<()> {
    while let Some(mut child) = el.next_tag() {
        if child.start_el().local() == name {
            each(&mut child)?;
        }
    }
    Ok(())
}

fn root<'a, 'inp>(doc: &'a mut Document<'inp>, name: &str) -> Result<ScopedDecoder<'inp, 'a>> {
    let root = doc.root_element().map_err(|e| anyhow!("{e}"))?;
    if root.start_el().local() != name {
        bail!("root element is <{}>, not <{name}>", root.start_el().local());
    }
    Ok(root)
}

/// `DescribeStacksResponse/DescribeStacksResult/Stacks/member[1]`.
fn parse_describe_stacks(xml: &str) -> Result<Option<StackDescription>> {
    let mut doc = Document::new(xml);
    let mut response = root(&mut doc, "DescribeStacksResponse")?;
    let mut found = None;
    children(&mut response, "DescribeStacksResult", |result| {
        children(result, "Stacks", |stacks| {
            children(stacks, "member", |member| {
                let mut d = StackDescription::default();
                while let Some(mut field) = member.next_tag() {
                    match field.start_el().local() {
                        "StackStatus" => d.status = text(&mut field)?,
                        "StackStatusReason" => d.reason = Some(text(&mut field)?),
                        "Outputs" => children(&mut field, "member", |output| {
                            let (mut key, mut value) = (None, None);
                            while let Some(mut f) = output.next_tag() {
                                match f.start_el().local() {
                                    "OutputKey" => key = Some(text(&mut f)?),
                                    "OutputValue" => value = Some(text(&mut f)?),
                                    _ => {}
                                }
                            }
                            if let (Some(k), Some(v)) = (key, value) {
                                d.outputs.push((k, v));
                            }
                            Ok(())
                        })?,
                        _ => {}
                    }
                }
                if found.is_none() {
                    found = Some(d);
                }
                Ok(())
            })
        })
    })?;
    Ok(found)
}

/// `ListStackResourcesResponse/ListStackResourcesResult/{StackResourceSummaries/member*, NextToken}`.
fn parse_list_stack_resources(xml: &str) -> Result<(Vec<ResourceSummary>, Option<String>)> {
    let mut doc = Document::new(xml);
    let mut response = root(&mut doc, "ListStackResourcesResponse")?;
    let (mut out, mut next) = (Vec::new(), None);
    children(&mut response, "ListStackResourcesResult", |result| {
        while let Some(mut field) = result.next_tag() {
            match field.start_el().local() {
                "NextToken" => next = Some(text(&mut field)?),
                "StackResourceSummaries" => children(&mut field, "member", |member| {
                    let mut r = ResourceSummary::default();
                    while let Some(mut f) = member.next_tag() {
                        match f.start_el().local() {
                            "LogicalResourceId" => r.logical_id = text(&mut f)?,
                            "PhysicalResourceId" => r.physical_id = Some(text(&mut f)?),
                            "ResourceType" => r.resource_type = text(&mut f)?,
                            _ => {}
                        }
                    }
                    out.push(r);
                    Ok(())
                })?,
                _ => {}
            }
        }
        Ok(())
    })?;
    Ok((out, next))
}

/// `ErrorResponse/Error/{Code, Message}` as `Code: Message`, when the reply is one.
fn error_message(xml: &str) -> Option<String> {
    let mut doc = Document::new(xml);
    let mut response = root(&mut doc, "ErrorResponse").ok()?;
    let mut message = None;
    children(&mut response, "Error", |error| {
        let (mut code, mut said) = (String::new(), String::new());
        while let Some(mut f) = error.next_tag() {
            match f.start_el().local() {
                "Code" => code = text(&mut f)?,
                "Message" => said = text(&mut f)?,
                _ => {}
            }
        }
        message = Some(format!("{code}: {said}"));
        Ok(())
    })
    .ok()?;
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_stacks_reply() {
        let xml = r#"<DescribeStacksResponse xmlns="http://cloudformation.amazonaws.com/doc/2010-05-15/">
  <DescribeStacksResult><Stacks><member>
    <StackName>t-x</StackName><StackStatus>CREATE_FAILED</StackStatus>
    <StackStatusReason>a &amp; b</StackStatusReason>
    <Parameters><member><ParameterKey>Env</ParameterKey><ParameterValue>local</ParameterValue></member></Parameters>
    <Outputs>
      <member><OutputKey>BucketName</OutputKey><OutputValue>b-1</OutputValue></member>
      <member><Description>d</Description><OutputKey>TokenKeyId</OutputKey><OutputValue>k-2</OutputValue></member>
      <member><OutputKey>NoValue</OutputKey></member>
    </Outputs>
  </member></Stacks></DescribeStacksResult>
  <ResponseMetadata><RequestId>r</RequestId></ResponseMetadata>
</DescribeStacksResponse>"#;
        let d = parse_describe_stacks(xml).unwrap().unwrap();
        assert_eq!(d.status, "CREATE_FAILED");
        assert_eq!(d.reason.as_deref(), Some("a & b"));
        assert_eq!(
            d.outputs,
            vec![
                ("BucketName".to_string(), "b-1".to_string()),
                ("TokenKeyId".to_string(), "k-2".to_string())
            ]
        );
        let empty = r#"<DescribeStacksResponse><DescribeStacksResult><Stacks/></DescribeStacksResult></DescribeStacksResponse>"#;
        assert_eq!(parse_describe_stacks(empty).unwrap(), None);
        assert!(parse_describe_stacks("<Other/>").is_err());
        assert!(parse_describe_stacks("not xml").is_err());
    }

    #[test]
    fn list_stack_resources_reply_and_token() {
        let xml = r#"<ListStackResourcesResponse><ListStackResourcesResult>
  <StackResourceSummaries>
    <member><LogicalResourceId>Bucket</LogicalResourceId><PhysicalResourceId>b-1</PhysicalResourceId><ResourceType>AWS::S3::Bucket</ResourceType></member>
    <member><LogicalResourceId>Pending</LogicalResourceId><ResourceType>AWS::SQS::Queue</ResourceType></member>
  </StackResourceSummaries>
  <NextToken>page-2</NextToken>
</ListStackResourcesResult></ListStackResourcesResponse>"#;
        let (rs, next) = parse_list_stack_resources(xml).unwrap();
        assert_eq!(next.as_deref(), Some("page-2"));
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[0].logical_id, "Bucket");
        assert_eq!(rs[0].physical_id.as_deref(), Some("b-1"));
        assert_eq!(rs[0].resource_type, "AWS::S3::Bucket");
        assert_eq!(rs[1].physical_id, None);
    }

    #[test]
    fn error_reply() {
        let xml = r#"<ErrorResponse xmlns="http://cloudformation.amazonaws.com/doc/2010-05-15/"><Error><Type>Sender</Type><Code>ValidationError</Code><Message>Stack with id t-x does not exist</Message></Error><RequestId>r</RequestId></ErrorResponse>"#;
        assert_eq!(
            error_message(xml).as_deref(),
            Some("ValidationError: Stack with id t-x does not exist")
        );
        assert_eq!(error_message("<html>502</html>"), None);
    }
}
