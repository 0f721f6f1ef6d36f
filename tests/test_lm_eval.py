"""lm-evaluation-harness on a saved checkpoint, with the README's command (`lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True`), offline: a loglikelihood (multiple-choice) task and a generate_until task
written as YAML (`--include_path`) over a local JSON-lines file. The harness runs the checkpoint's own model code (no
default_moe import), and its log-likelihoods and greedy generations are our model's."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_checkpoint import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")

DOCS = [{"context": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 7} w{i}"], "label": 0} for i in range(4)]

TASKS = {
    "dmoe_choice": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""",
    "dmoe_generate": """
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs: {until: ["<eos>"], max_gen_toks: 4, do_sample: false}
metric_list:
  - metric: exact_match
""",
}


def _samples(output: os.PathLike, task: str) -> list[dict]:
    (path,) = sorted(output.glob(f"*/samples_{task}_*.jsonl"))
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lm_eval_cli_on_local_tasks(tmp_path):
    folder, tasks, output = tmp_path / "model", tmp_path / "tasks", tmp_path / "results"
    model = tiny_model(seed=3)
    model.save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    source = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(f"task: {name}\n{source}{body}")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args"]
    command += [f"pretrained={folder},trust_remote_code=True", "--tasks", ",".join(TASKS), "--include_path"]
    command += [str(tasks), "--device", "cpu", "--batch_size", "2", "--output_path", str(output), "--log_samples"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list((tmp_path / "modules").rglob("modeling_default_moe.py"))  # the checkpoint's code ran
    (results_file,) = output.glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert "acc,none" in results["dmoe_choice"] and "exact_match,none" in results["dmoe_generate"]

    def encode(text):
        return tokenizer(text, return_tensors="pt").input_ids

    with torch.no_grad():
        for sample in _samples(output, "dmoe_choice"):
            doc = sample["doc"]
            context = encode(doc["context"]).shape[1]
            for choice, (loglikelihood, _) in zip(doc["choices"], sample["filtered_resps"]):
                ids = encode(f"{doc['context']} {choice}")
                logprobs = torch.log_softmax(model(ids).logits[0, context - 1 : -1], dim=-1)
                expected = logprobs.gather(1, ids[0, context:, None]).sum()
                torch.testing.assert_close(torch.tensor(float(loglikelihood)), expected, rtol=1e-5, atol=1e-5)
        for sample in _samples(output, "dmoe_generate"):
            ids = encode(sample["doc"]["context"])
            new = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)[0, ids.shape[1] :].tolist()
            new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
            assert sample["filtered_resps"] == [tokenizer.decode(new, skip_special_tokens=True)], sample
