"""server/mlflow_app.py's index-page change, as pure text (tests/test_dashboard.py runs it in a real server and
a real browser)."""

from __future__ import annotations

from server.mlflow_app import DEFAULT_WORKFLOW_SCRIPT, MODEL_TRAINING, WORKFLOW_STORAGE_KEY, with_model_training_default

INDEX = '<!doctype html><html><head><meta charset="utf-8"/><script defer src="main.js"></script></head><body></body>'


def test_the_script_goes_first_in_the_head_once() -> None:
    page = with_model_training_default(INDEX)
    assert page.startswith("<!doctype html><html><head>" + DEFAULT_WORKFLOW_SCRIPT + '<meta charset="utf-8"/>')
    assert with_model_training_default(page) == page


def test_a_page_without_a_head_is_left_alone() -> None:
    assert with_model_training_default("<p>not the UI</p>") == "<p>not the UI</p>"


def test_the_script_sets_model_training_only_where_the_browser_holds_no_choice() -> None:
    # MLflow's useLocalStorage stores JSON under f"{key}_v{version}"; a choice already stored is left as it is.
    assert f'window.localStorage.getItem("{WORKFLOW_STORAGE_KEY}")===null' in DEFAULT_WORKFLOW_SCRIPT
    assert f'setItem("{WORKFLOW_STORAGE_KEY}","\\"{MODEL_TRAINING}\\"")' in DEFAULT_WORKFLOW_SCRIPT
