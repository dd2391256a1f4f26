"""/healthz and /metrics over real HTTP on loopback, figures read from a real database."""

import json
import urllib.error
import urllib.request

from builders import Patient, encode, pathology_result, us_image

from mrrp_pacs.health import HealthServer, metrics_text


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_metrics_count_what_the_database_holds(store, intake):
    patient = Patient("P-77", "HOSP")
    assert intake.receive_dicom(encode(us_image(patient)), "test").row_id
    assert intake.receive_hl7(pathology_result(patient), "test").row_id
    with store.transaction() as conn:
        conn.execute("INSERT INTO jobs (kind, state, started_at, finished_at, detail) VALUES "
                     "('process', 'done', 'a', 'b', ?)",
                     (json.dumps({"due": 3, "waiting": 2, "incomplete": 1, "seconds": 1.5}),))
        conn.execute("INSERT INTO exports (kind, destination, state, created_at, updated_at) "
                     "VALUES ('sr', 'pacs', 'dead', 'a', 'a')")
    text = metrics_text(store)
    assert "mrrp_dicom_instances_stored_total 1\n" in text
    assert "mrrp_hl7_messages_received_total 1\n" in text
    assert 'mrrp_exports{state="dead"} 1\n' in text
    assert 'mrrp_exports{state="pending"} 0\n' in text
    assert 'mrrp_cases{state="waiting"} 2\n' in text
    assert 'mrrp_job_last_duration_seconds{kind="process"} 1.5\n' in text
    assert 'mrrp_jobs_total{kind="process",state="done"} 1\n' in text
    assert "# TYPE mrrp_patients_scored gauge" in text
    assert "P-77" not in text


def test_a_scoring_run_without_a_model_is_a_failed_job_and_counts_the_ready_cases(
        store, intake, config):
    """So that alerts on failed jobs fire, and /metrics agrees with `mrrp-pacs cases`."""
    from mrrp_pacs.daemon import Pipeline

    patient = Patient("P-78", "HOSP")
    assert intake.receive_dicom(encode(us_image(patient)), "test").row_id
    assert intake.receive_hl7(pathology_result(patient), "test").row_id
    pipeline = Pipeline(config.replace("scoring", wait_hours=0.0))
    try:
        detail = pipeline.process()
    finally:
        pipeline.close()
    assert (detail.no_model, detail.due, detail.waiting) == (True, 1, 0)
    state, error = store.conn.execute("SELECT state, error FROM jobs").fetchone()
    assert state == "failed" and error.startswith("no model mrrp/mrrp in ")
    text = metrics_text(store)
    assert 'mrrp_cases{state="due"} 1\n' in text
    assert 'mrrp_jobs_total{kind="process",state="failed"} 1\n' in text


def test_healthz_reports_each_component_and_fails_when_one_is_down(store, config):
    alive = {"dicom": True}
    server = HealthServer(config.paths.db_file, config.paths.objects_dir, "127.0.0.1", 0,
                          {"dicom": lambda: alive["dicom"]})
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, kind, body = _get(f"{base}/healthz")
        assert status == 200 and kind == "application/json"
        assert json.loads(body) == {"status": "ok",
                                    "components": {"dicom": True, "database": True}}
        alive["dicom"] = False
        status, _, body = _get(f"{base}/healthz")
        assert status == 503 and json.loads(body)["components"]["dicom"] is False
        status, kind, body = _get(f"{base}/metrics")
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        assert "mrrp_scores_total 0" in body
        assert _get(f"{base}/other")[0] == 404
    finally:
        server.stop()


def test_metrics_are_for_this_machine_or_a_bearer_token(store, config):
    from mrrp_pacs.health import metrics_allowed

    # without a token: loopback peers only (IPv4, IPv6, IPv4-mapped)
    assert metrics_allowed("127.0.0.1", None, "") == 200
    assert metrics_allowed("::1", None, "") == 200
    assert metrics_allowed("::ffff:127.0.0.1", None, "") == 200
    assert metrics_allowed("10.1.2.3", None, "") == 403
    assert metrics_allowed("::ffff:10.1.2.3", "Bearer guess", "") == 403
    # with one: the token, from anywhere, and nothing else, not even from loopback
    assert metrics_allowed("10.1.2.3", "Bearer s3cret-token", "s3cret-token") == 200
    assert metrics_allowed("127.0.0.1", None, "s3cret-token") == 401
    assert metrics_allowed("127.0.0.1", "Bearer s3cret-tokeN", "s3cret-token") == 401
    assert metrics_allowed("127.0.0.1", "Basic czNjcmV0LXRva2Vu", "s3cret-token") == 401

    server = HealthServer(config.paths.db_file, config.paths.objects_dir, "127.0.0.1", 0, {},
                          metrics_token="s3cret-token")
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, _, body = _get(f"{base}/metrics")
        assert status == 401 and "mrrp_" not in body
        request = urllib.request.Request(f"{base}/metrics",
                                         headers={"Authorization": "Bearer s3cret-token"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200 and "mrrp_scores_total 0" in answer.read().decode()
        assert _get(f"{base}/healthz")[0] == 200  # health stays open
    finally:
        server.stop()
