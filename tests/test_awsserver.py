"""The moto server the S3 and SNS tests run against answers like AWS to boto3."""

from __future__ import annotations

import boto3

from awsserver import AwsServer


def test_the_server_speaks_s3_and_sns_and_resets(aws: AwsServer) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="photos")
    s3.put_object(Bucket="photos", Key="a/b.jpg", Body=b"x")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="photos")["Contents"]] == ["a/b.jpg"]
    arn = boto3.client("sns").create_topic(Name="ops")["TopicArn"]
    assert arn.endswith(":ops")
    aws.reset()
    assert s3.list_buckets()["Buckets"] == []
