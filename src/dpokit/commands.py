"""Each command's parser: its flags, help and examples, and the `module:function` that runs it (see `dpokit.cli`).

Keys of the config that a command reads get their flags from `dpokit.settings`, never by hand here.
"""

from __future__ import annotations

import argparse

from dpokit import settings
from dpokit.config import BUILTIN_MODEL


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=110)


def _command(
    sub: argparse._SubParsersAction, name: str, target: str, help: str, description: str
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=description, formatter_class=formatter)
    parser.set_defaults(target=target)
    return parser


# --- train and config ---------------------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "train",
        "dpokit.train:run",
        "train a policy with DPO",
        "Train with DPO. Settings come from defaults, then CONFIG.yaml, then key=value overrides; `dpokit config` "
        "lists every key. Writes config.yaml, metrics.jsonl, TensorBoard events, checkpoints, the adapter (or "
        "model) and summary.json into output_dir.\n\n"
        "examples:\n"
        "  dpokit train train_data=pairs.jsonl\n"
        "  dpokit train configs/smollm2-lora.yaml learning_rate=1e-5 max_steps=200\n"
        "  dpokit train configs/smollm2-lora.yaml resume=true\n"
        "  dpokit train --config trl_dpo.yaml --beta 0.1 --loss_type sigmoid sft   (TRL's flags work too)\n"
        "  accelerate launch --num_processes 2 -m dpokit train config.yaml",
    )
    p.add_argument(
        "settings", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="a YAML config and/or overrides"
    )


def _add_sft(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "sft",
        "dpokit.sft:run",
        "supervised fine-tuning, the stage before DPO",
        "Fine-tune on SFT examples (messages, ShareGPT conversations, prompt/completion, Alpaca, text) or, with "
        "sft_on=chosen, on the chosen responses of preference pairs. Same keys, outputs, checkpoints and resume "
        "as `dpokit train` (DPO-only keys are refused); `dpokit config` lists the sft keys last.\n\n"
        "examples:\n"
        "  dpokit sft train_data=chat.jsonl assistant_only_loss=false\n"
        "  dpokit sft train_data=pairs.jsonl sft_on=chosen output_dir=runs/sft\n"
        "  accelerate launch --num_processes 2 -m dpokit sft config.yaml packing=true",
    )
    p.add_argument(
        "settings", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="a YAML config and/or overrides"
    )


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "config",
        "dpokit.cli:run_config",
        "print every training key with its default and meaning",
        "Print every key `dpokit train` accepts, grouped, with its default, type and meaning. With CONFIG.yaml "
        "and overrides, print the resolved config instead (validated, as a run would use it).",
    )
    p.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="resolve this config")


# --- data -------------------------------------------------------------------------------------------------------------


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser(
        "data",
        help="inspect, prepare and list formats of preference data",
        description="Look at preference data and turn it into clean train/test triplets.",
        formatter_class=formatter,
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="{inspect,prepare,formats}", required=True)

    inspect = _command(
        data_sub,
        "inspect",
        "dpokit.data.inspection:run",
        "row count, format, token lengths and quality warnings",
        "Print the row count, detected format, token-length percentiles under the model's tokenizer, what the "
        "length limits would cut, and quality warnings (identical or empty responses, duplicates, length bias).",
    )
    inspect.add_argument("data", help="file, folder or hub dataset id")
    _add_data_options(inspect, "data inspect")
    inspect.add_argument("--plot", metavar="FILE.png", help="write token-length histograms here")
    inspect.add_argument("--json", action="store_true", help="print the statistics as JSON")

    prepare = _command(
        data_sub,
        "prepare",
        "dpokit.data.prepare:run",
        "write normalized, deduplicated train/test triplets",
        "Normalize any supported layout to conversational prompt/chosen/rejected triplets, drop duplicates and "
        "over-long pairs, and split off a test set. Prints how many rows went where and why.",
    )
    prepare.add_argument("data", help="file, folder or hub dataset id")
    prepare.add_argument(
        "--output", required=True, metavar="OUT.jsonl", help="training triplets; the test split goes to OUT.test.jsonl"
    )
    prepare.add_argument(
        "--overwrite", action="store_true", help="replace OUT.jsonl and OUT.test.jsonl if they exist already"
    )
    _add_data_options(prepare, "data prepare")
    prepare.add_argument(
        "--test-size",
        type=float,
        default=0.1,
        help="share (below 1) or number of pairs held out for testing, whole prompts at a time (default 0.1)",
    )
    prepare.add_argument(
        "--seed", dest="split_seed", type=int, default=42, help="seed of the train/test split (default 42)"
    )
    prepare.add_argument(
        "--filter-percentile",
        type=float,
        default=None,
        metavar="P",
        help="drop pairs whose prompt + longer response exceeds the P-th percentile of lengths (e.g. 95); "
        "not with --max-length",
    )

    _command(
        data_sub,
        "formats",
        "dpokit.data.inspection:run_formats",
        "list the supported data layouts",
        "List every data layout dpokit reads, with the columns it expects.",
    )


def _add_data_options(p: argparse.ArgumentParser, command: str) -> None:
    """A training config to read the data keys from, and the keys' flags (`dpokit.settings`)."""
    p.add_argument(
        "--config",
        default=None,
        metavar="CONFIG.yaml",
        help="a training config: its model, chat template, data and length keys become the defaults",
    )
    settings.add_flags(p, command)


# --- generate, evaluate, compare, chat, vibe, merge, report ---------------------------------------------------


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "generate",
        "dpokit.onpolicy:run",
        "sample answers to prompts and pair the best with the worst",
        "Sample several answers per prompt, score them with a judge and write best-vs-worst pairs, ready for\n"
        "`dpokit train`. Identical answers are judged once; ties and pairs under --min-margin are left out and\n"
        "counted. Prompts that gave no pair are listed with the reason in <output stem>.skipped.jsonl.\n"
        "Rows are appended and synced batch by batch; rerunning the same command continues where it stopped.\n"
        "Under `accelerate launch` the prompts are shared out and the outputs merged in order.\n\n"
        "judges:\n"
        "  python:module:function      your function(prompt, response) -> float (also python:path/file.py:fn)\n"
        "  reward-model:ID             a sequence-classification reward model\n"
        "  llm:MODEL                   a local causal LM asked for a 1-10 score\n"
        "  openai:MODEL@BASE_URL       any OpenAI-compatible endpoint; key from $OPENAI_API_KEY\n\n"
        "examples:\n"
        "  dpokit generate --prompts prompts.txt --judge python:my_rules.py:reward --output pairs.jsonl\n"
        "  dpokit generate --prompts question.jsonl --num-samples 8 --output pairs.jsonl \\\n"
        "      --judge openai:qwen2.5-7b@http://127.0.0.1:8000/v1",
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter folder on top of --model")
    p.add_argument(
        "--prompts", required=True, help="text file (one prompt per line), JSONL/JSON/CSV/Parquet, folder or hub id"
    )
    p.add_argument(
        "--prompt-column",
        default=None,
        help="column holding the prompt (default: prompt, question, instruction, messages or turns)",
    )
    p.add_argument("--split", default="train", help="split of a hub dataset (default train)")
    p.add_argument("--data-config", default=None, help="config name of a hub dataset")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--num-samples", type=int, default=4, help="answers per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--seed", dest="sampling_seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="answers generated per forward batch (default 16)")
    p.add_argument("--judge", required=True, help="judge spec (see above)")
    p.add_argument(
        "--pairing",
        choices=("best-worst", "best-random"),
        default="best-worst",
        help="rejected answer: the worst, or a random lower-scored one (default best-worst)",
    )
    p.add_argument("--min-margin", type=float, default=0.0, help="least score gap for a pair (default 0: no ties)")
    _add_judge_options(p)
    p.add_argument("--output", required=True, metavar="PAIRS.jsonl", help="pairs file (appended, resumable)")
    settings.add_flags(p, "generate")  # --model (default: the adapter's base, else builtin), --system-message, ...


def _add_judge_options(p: argparse.ArgumentParser) -> None:
    """The --judge-* flags, read by `dpokit.judges.judge_options_from_args`."""
    g = p.add_argument_group("judge options")
    g.add_argument("--judge-concurrency", type=int, default=None, help="openai: requests in flight (default 8)")
    g.add_argument("--judge-timeout", type=float, default=None, help="openai: seconds per request (default 60)")
    g.add_argument(
        "--judge-retries", type=int, default=None, help="openai: retries with exponential backoff (default 3)"
    )
    g.add_argument(
        "--judge-api-key-env",
        default=None,
        metavar="VAR",
        help="openai: environment variable with the API key (default OPENAI_API_KEY)",
    )
    g.add_argument("--judge-max-tokens", type=int, default=None, help="llm, openai: longest reply (default 64)")
    g.add_argument(
        "--judge-batch-size", type=int, default=None, help="reward-model, llm: sequences per batch (default 8)"
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "eval",
        "dpokit.evaluate:run_eval",
        "implicit-reward accuracy and margin on held-out pairs",
        "Score held-out pairs with the implicit DPO reward beta * (log pi - log pi_ref), summed over response "
        "tokens as in training (RewardBench's DPO mode): reward accuracy (chosen reward strictly higher) with a "
        "bootstrap 95% interval, mean margin, mean rewards and mean log-probs, as JSON on stdout.\n\n"
        "The reference: with --adapter, the same base model with the adapter switched off (as in LoRA training); "
        "for a fully fine-tuned --model, the model it started from, given with --reference. beta, loss_type, the "
        "length and data keys, the chat template and the quantization are the trained run's (the adapter's "
        "dpokit.json, else its run folder's config.yaml), else the config defaults; each has its flag below. When "
        "the adapter sits in a run folder and no --output is given, the JSON is also written to RUN_DIR/eval.json for "
        "`dpokit report`.\n\n"
        "examples:\n"
        "  dpokit eval --adapter runs/dpo/adapter --data test.jsonl\n"
        "  dpokit eval --model runs/full --reference builtin:smollm2-135m-instruct --data test.jsonl --beta 0.1",
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter: the policy (default --model: the adapter's base)")
    p.add_argument("--reference", default=None, help="reference model for a --model trained without an adapter")
    p.add_argument("--data", required=True, help="held-out pairs (any layout `dpokit data formats` lists)")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the JSON here")
    settings.add_flags(p, "eval")  # --model (the base, or the policy itself with --reference), --beta, ...


def _add_answering_options(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    """How `compare`, `chat` and `vibe` generate answers."""
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature:g})")
    p.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help=f"longest answer (default {max_new_tokens})"
    )
    p.add_argument(
        "--seed",
        dest="sampling_seed",
        type=int,
        default=0,
        help="sampling seed; compare also seeds its bootstrap with it (default 0)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "compare",
        "dpokit.compare:run_compare",
        "judge two models' answers pairwise, in both orders",
        "Generate answers from model A and model B and judge every (question, turn) twice, with the answers' "
        "order swapped. B wins only when both orders say so (likewise A); any other pair of verdicts is a tie "
        "(MT-Bench's rule). A judge that gives no verdict in either order is a failure, counted apart and left "
        "out of every rate, as MT-Bench drops its 'error' judgments.\n\n"
        "Reads MT-Bench's question.jsonl (second turns are asked in the same conversation), JSONL, CSV or Parquet "
        "rows with a `prompt`, or a text file with one prompt per line. Writes an MT-Bench bench folder: "
        "question.jsonl, model_answer/<model_id>.jsonl, model_judgment/dpokit_pair.jsonl, and summary.json with "
        "wins, ties, losses (B's), win_rate = wins / total, win_rate_adjusted = (wins + ties/2) / total with a "
        "bootstrap 95% interval (ci_low, ci_high; questions resampled), per category, and mean answer lengths.\n\n"
        "example:\n"
        "  dpokit compare --adapter-b runs/dpo/adapter --prompts question.jsonl --judge openai:gpt-4o@https://...\n"
        "  (model A defaults to model B's base without the adapter; output to runs/dpo/compare)",
    )
    p.add_argument("--model-a", default=None, help="first model (default: model B's base)")
    p.add_argument("--adapter-a", default=None, help="LoRA adapter on model A")
    p.add_argument("--model-b", default=None, help="second model (default: the base of --adapter-b)")
    p.add_argument("--adapter-b", default=None, help="LoRA adapter on model B (usually the aligned one)")
    p.add_argument("--name-a", default=None, help="model_id of A in the outputs (default from its name)")
    p.add_argument("--name-b", default=None, help="model_id of B in the outputs (default from its name)")
    p.add_argument(
        "--prompts", required=True, help="MT-Bench question.jsonl, JSONL/CSV/Parquet `prompt` rows, or a .txt file"
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--judge", required=True, help="judge spec, as for generate")
    p.add_argument(
        "--output", default=None, metavar="DIR", help="folder for the results (default: RUN_DIR/compare of B)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --output")
    g = p.add_argument_group("MT-Bench files (FastChat's layouts)")
    g.add_argument("--judge-prompts", default=None, metavar="FILE", help="judge_prompts.jsonl: judge with pair-v2")
    g.add_argument("--reference-answers", default=None, metavar="FILE", help="reference_answer/gpt-4.jsonl")
    g.add_argument("--answers-a", default=None, metavar="FILE", help="model_answer/<name>.jsonl: A's answers, made")
    g.add_argument("--answers-b", default=None, metavar="FILE", help="model_answer/<name>.jsonl: B's answers, made")
    _add_answering_options(p, temperature=0.0, max_new_tokens=512)
    _add_judge_options(p)
    settings.add_flags(p, "compare", skip=("model_name_or_path",))  # each side's model: --model-a, --model-b


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "chat",
        "dpokit.chat:run_chat",
        "chat with a model in the terminal",
        "Interactive chat with the model's chat template. /reset clears the conversation, /exit (or end of "
        "input) leaves. Lines are read from stdin, so a conversation can be piped in.",
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter on the model")
    p.add_argument("--system", default=None, help="a system message to start every conversation with")
    _add_answering_options(p, temperature=0.7, max_new_tokens=256)
    settings.add_flags(p, "chat")  # --model (default: the adapter's base, else the built-in model), ...


def _add_vibe(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "vibe",
        "dpokit.vibe:run_vibe",
        "base and aligned answers side by side",
        "Answer a few prompts with the base model (adapter off) and with the adapter, print them side by side "
        "and save them as JSONL (default: RUN_DIR/vibe.jsonl of the adapter's run, read by `dpokit report`).",
    )
    p.add_argument("--adapter", required=True, help="LoRA adapter (the aligned model)")
    p.add_argument("--prompts", required=True, help="prompts file (as for compare)")
    p.add_argument("--limit", type=int, default=5, help="how many prompts, from the top (default 5)")
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="where to save (default: RUN_DIR/vibe.jsonl)")
    _add_answering_options(p, temperature=0.0, max_new_tokens=256)
    settings.add_flags(p, "vibe")  # --model (default: the adapter's own base), ...


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "merge",
        "dpokit.merge:run_merge",
        "merge a LoRA adapter into its base model",
        "Merge a LoRA adapter into its base (adapter_dir/dpokit.json's base_model, else adapter_config.json's "
        "base_model_name_or_path) and save safetensors plus tokenizer, loadable with plain "
        "AutoModelForCausalLM.from_pretrained. Before saving, the merged model's logits on a probe conversation "
        "must match the unmerged model's within 1e-4 of the largest logit.",
    )
    p.add_argument("--adapter", required=True, help="LoRA adapter folder")
    p.add_argument("--output", required=True, metavar="DIR", help="new folder for the merged model")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (default auto: the base's)",
    )
    settings.add_flags(p, "merge")  # --model (the base, when it moved; default: the adapter's own), ...


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "report",
        "dpokit.report:run",
        "write an HTML report of a run",
        "Write RUN_DIR/report.html, one self-contained file (plots embedded as PNG): losses, rewards, "
        "accuracies, learning rate, the resolved config, data statistics, the run summary, and what eval "
        "(eval.json), compare (any RUN_DIR/*/summary.json, e.g. RUN_DIR/compare) and vibe (vibe.jsonl) left in "
        "the run folder. Model text is escaped and the page runs no scripts.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `dpokit train` output folder")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "demo",
        "dpokit.demo:run",
        "the whole workflow offline on a CPU with the built-in model",
        "Run the whole workflow offline on the built-in SmolLM2-135M-Instruct, with a built-in task: prompts that ask\n"
        'for an answer of a given number of words ("Describe the ocean in 6 to 11 words."), and a rule judge that\n'
        "counts them. The base model mostly keeps talking; DPO on its own judged samples teaches it the range.\n"
        "Training and held-out prompts are about different topics, so the result is measured on unseen prompts.\n"
        "\n"
        "Stages (each with a progress bar; the same code as the command named):\n"
        "  1 generate  (dpokit generate) the base model samples --samples answers to each of --train-prompts\n"
        "              prompts; the judge keeps the best and the worst as a pair\n"
        "  2 baseline  the base model answers --heldout-prompts held-out prompts, greedily\n"
        "  3 train     (dpokit train) DPO with LoRA on the pairs, --steps optimizer steps of 8 pairs\n"
        "  4 compare   (dpokit compare) the aligned model answers the same held-out prompts; the judge scores both\n"
        "              answers in both orders: win rate with a bootstrap 95% interval, and the share of answers\n"
        "              inside the range before and after\n"
        "  5 report    (dpokit report) report.html in the run folder, result.json, and a summary\n"
        "\n"
        "Output folder: prompts/, pairs.jsonl, train.yaml (the run's config), run/ (metrics, adapter, compare/,\n"
        "report.html) and result.json. Rerunning into the same folder keeps pairs made with the same settings.\n"
        "With the defaults the demo takes about ten minutes on two CPU cores; on a GPU, raise the knobs\n"
        "(e.g. --train-prompts 2000 --samples 8 --steps 400) for a larger, tighter result.",
    )
    p.add_argument("--output", default="demo-output", metavar="DIR", help="folder for everything the demo makes")
    p.add_argument(
        "--train-prompts", type=int, default=128, metavar="N", help="training prompts to sample pairs from (128)"
    )
    p.add_argument(
        "--heldout-prompts", type=int, default=128, metavar="N", help="held-out prompts the result is measured on (128)"
    )
    p.add_argument("--samples", type=int, default=6, metavar="N", help="answers sampled per training prompt (6)")
    p.add_argument("--steps", type=int, default=40, metavar="N", help="DPO optimizer steps, 8 pairs each (40)")
    p.add_argument("--seed", type=int, default=0, help="picks the prompts, the samples and the LoRA init (0)")
    p.add_argument(
        "--model",
        default=BUILTIN_MODEL,
        metavar="M",
        help="the model to align, a hub id or folder (default: the built-in model, which the defaults suit)",
    )


COMMANDS = (
    _add_train,
    _add_sft,
    _add_config,
    _add_data,
    _add_generate,
    _add_eval,
    _add_compare,
    _add_chat,
    _add_vibe,
    _add_merge,
    _add_report,
    _add_demo,
)
