"""A site's progress lines (client.progress): throttled, and where they go decides what they reveal."""

from dataclasses import replace

from client.progress import Progress, site_progress
from client.site import SitePolicy
from fedslm.common.config import resolve
from fedslm.common.vocabulary import RunConfig


def test_lines_when_done_and_every_interval():
    now, lines = [0.0], []
    progress = Progress(lines.append, every_s=20.0, clock=lambda: now[0])
    for step, t in enumerate([5.0, 21.0, 30.0, 45.0, 46.0], start=1):
        now[0] = t
        progress.step(step, 5)
    progress.evaluated(8, 111)  # 1 s after the last line: quiet
    now[0] = 100.0
    progress.evaluated(111, 111)
    assert lines == ["step 2/5", "step 4/5", "step 5/5", "evaluated 111/111 records"]


def test_a_simulated_site_prints_unless_user_level_dp_and_a_deployed_one_logs_only_to_itself(capsys):
    config = resolve({"model.name": "tiny"})
    policy = SitePolicy.for_simulation(RunConfig.parse(config), "GARD", "/tmp/run")
    site_log = []
    site_progress(policy, False, site_log.append).step(5, 5)
    assert capsys.readouterr().out == "[fedslm] GARD: step 5/5\n"
    site_progress(policy, True, site_log.append).step(5, 5)
    site_progress(replace(policy, deployment=True), False, site_log.append).step(5, 5)
    assert capsys.readouterr().out == "" and site_log == ["step 5/5"]
