#!/usr/bin/env python3
"""Translate infra/template.yaml (SAM) into plain CloudFormation JSON, offline.

Usage: sam_translate.py TEMPLATE [--code-uri s3://bucket/key] > translated.json

Runs with the project's .venv/aws python (aws-sam-translator). The translator only accepts
`s3://bucket/key` CodeUris without a build step, so every function's CodeUri (and the Globals one)
is replaced in an in-memory copy of the template; the file itself is never modified.
No network access: managed policy names are not resolved (the template uses policy templates only).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from samtranslator.model.exceptions import InvalidDocumentException  # noqa: E402
from samtranslator.translator.transform import transform  # noqa: E402
from samtranslator.yaml_helper import yaml_parse  # noqa: E402


class OfflinePolicyLoader:
    """Stands in for the IAM-backed ManagedPolicyLoader: no AWS call, no managed policy names."""

    def load(self):
        return {}


def substitute_code_uris(template, code_uri):
    functions = template.get("Globals", {}).get("Function")
    if isinstance(functions, dict) and "CodeUri" in functions:
        functions["CodeUri"] = code_uri
    for resource in template.get("Resources", {}).values():
        if resource.get("Type") == "AWS::Serverless::Function":
            props = resource.setdefault("Properties", {})
            if "CodeUri" in props or "CodeUri" not in (functions or {}):
                props["CodeUri"] = code_uri


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template")
    parser.add_argument("--code-uri", default="s3://relay-local-artifacts/bootstrap.zip")
    args = parser.parse_args()

    with open(args.template, encoding="utf-8") as f:
        template = yaml_parse(f.read())
    substitute_code_uris(template, args.code_uri)
    try:
        translated = transform(template, {}, OfflinePolicyLoader())
    except InvalidDocumentException as err:
        for cause in err.causes:
            print(f"sam_translate: {cause.message}", file=sys.stderr)
        return 1
    json.dump(translated, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
