"""`sd3fp8 serve --ray` options, without starting Ray."""

import argparse
import pickle

import pytest

from sd3fp8.cli import serve as serve_cli
from sd3fp8.errors import ConfigError
from sd3fp8.scale.cli import backend_factory, check_args
from sd3fp8.scale.ray_serve import RayOptions, parse_autoscale, worker_options


def parse(*argv):
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_flags():
    args = parse("--ray", "--replicas", "3")
    assert args.ray and args.replicas == 3 and args.autoscale is None
    check_args(args)
    assert parse("--ray", "--autoscale", "1,4").autoscale == "1,4"
    with pytest.raises(ConfigError, match="need --ray"):
        check_args(parse("--replicas", "2"))
    with pytest.raises(ConfigError, match="either"):
        check_args(parse("--ray", "--replicas", "2", "--autoscale", "1,2"))


def test_autoscale_and_replicas():
    assert parse_autoscale("1,8") == (1, 8)
    for bad in ("8", "a,b", "1,2,3"):
        with pytest.raises(ConfigError, match="MIN,MAX"):
            parse_autoscale(bad)
    with pytest.raises(ConfigError):
        RayOptions(autoscale=(4, 2))
    with pytest.raises(ConfigError):
        RayOptions(replicas=0)


def test_worker_options():
    fixed = worker_options(RayOptions(replicas=3), has_gpus=True)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert fixed["health_check_period_s"] > 0 and "autoscaling_config" not in fixed
    cpu = worker_options(RayOptions(autoscale=(0, 4)), has_gpus=False)
    assert cpu["ray_actor_options"]["num_gpus"] == 0 and "num_replicas" not in cpu
    assert cpu["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}


def test_the_backend_factory_travels_to_replicas():
    factory = pickle.loads(pickle.dumps(backend_factory(None, threads=1)))
    assert factory.keywords == {"threads": 1} and factory.args == (None,)
