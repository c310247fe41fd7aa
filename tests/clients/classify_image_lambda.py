"""The original design's ClassifyImage Lambda, as its users wrote it: base64-decode the image
of the event, invoke the SageMaker endpoint with boto3, json.loads the answer's Body.

Run as a process (`python classify_image_lambda.py < event.json`): it prints the handler's
return value as JSON. boto3 finds the endpoint in AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME, and the
credentials and region in the environment, as a Lambda's would be.
"""

import base64
import json
import sys
from typing import Any

import boto3

ENDPOINT = "ics"

runtime = boto3.client("runtime.sagemaker")


def lambda_handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    image = base64.b64decode(event["body"]["image_data"])
    response = runtime.invoke_endpoint(EndpointName=ENDPOINT, ContentType="image/png", Body=image)
    inferences = json.loads(response["Body"].read().decode("utf-8"))
    event["body"]["inferences"] = inferences
    return {"statusCode": 200, "body": event["body"]}


if __name__ == "__main__":
    print(json.dumps(lambda_handler(json.load(sys.stdin), None)))
