"""The SageMaker Python SDK v2 against `ics serve`, as a user's code calls it: a Predictor of
the endpoint on a Session whose boto3 clients have `endpoint_url` at ICS.

Run with the SDK's own venv: `python sagemaker_v2_predict.py URL PHOTO`. It prints JSON:
the SDK's version, the answers of predict (by weight and with target_variant), the
endpoint's status as wait_for_endpoint reads it, and the model names the Predictor finds
through DescribeEndpoint and DescribeEndpointConfig. Credentials and region come from the
environment.
"""

import json
import sys

import boto3
import sagemaker
from sagemaker.deserializers import JSONDeserializer
from sagemaker.predictor import Predictor
from sagemaker.serializers import IdentitySerializer

url, photo = sys.argv[1], sys.argv[2]
boto_session = boto3.Session()
session = sagemaker.Session(
    boto_session=boto_session,
    sagemaker_client=boto_session.client("sagemaker", endpoint_url=url),
    sagemaker_runtime_client=boto_session.client("sagemaker-runtime", endpoint_url=url),
)
predictor = Predictor(
    "ics",
    sagemaker_session=session,
    serializer=IdentitySerializer(content_type="image/jpeg"),
    deserializer=JSONDeserializer(),
)
with open(photo, "rb") as f:
    image = f.read()
answer = {
    "version": sagemaker.__version__,
    "predict": predictor.predict(image),
    "predict_green": predictor.predict(image, target_variant="green"),
    "status": session.wait_for_endpoint("ics", poll=1)["EndpointStatus"],
    "models": predictor._get_model_names(),
}
# wait_for_endpoint prints its progress ("!") without a newline: the answer is a line of its own.
print("\n" + json.dumps(answer))
