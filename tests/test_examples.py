"""The examples run: the transformers scripts (in a subprocess) and the notebook (with nbclient)."""

from __future__ import annotations

import pytest
from helpers import ROOT, run_python

EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "vocabulary_growth.ipynb"


@pytest.mark.subprocess
def test_new_tokens_transformers_script(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "model"
    result = run_python(EXAMPLES / "new_tokens_transformers.py", out, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "trainable parameters: [(8, 32)]" in result.stdout
    assert "max |Δ| of the old rows after training: 0.0" in result.stdout
    assert "old rows bitwise equal, new rows as trained, head tied" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (72, 32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.slow
@pytest.mark.subprocess
def test_new_tokens_trainer_script(tmp_path):
    """LoRA + new rows with the Trainer; the adapter and a rows file, loaded onto a fresh base."""
    pytest.importorskip("peft")
    result = run_python(EXAMPLES / "new_tokens_trainer.py", tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "new rows [(64, 64), (64, 64)]" in result.stdout
    assert "old rows of the embedding and of the head: bitwise unchanged" in result.stdout
    assert "logits bitwise equal to the trained model's" in result.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # The rows file holds the 2 x 64 new rows of D=64 floats (plus names, indices, fingerprints), not the tables.
    size = (tmp_path / "new_rows.safetensors").stat().st_size
    assert 2 * 64 * 64 * 4 <= size < 2 * 64 * 64 * 4 + 64 * 1024


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is ipykernel's native kernel spec: jupyter_client runs it with sys.executable.
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError if a cell fails (its asserts included)

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "with the constraint:    max |Δ| of the old rows = 0.0\n" in text
    assert "reloaded into a plain model: old rows bitwise equal" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 2
