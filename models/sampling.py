"""Where a model's sampling settings come from, decided in one place.

generate() (and --evaluate_gen, demo/sample.py, the notebook, the web demo) takes each
sampling setting (models.checks.SAMPLING_KEYS) from the first of these that has it:

1. the caller: an argument of generate(), a flag;
2. the settings stored with the checkpoint ('sampling'), with 'sampling_source' saying who
   stored them: `python -m util.sweep --store` (with its FID and image count), the quick
   start, or training (a one-class model samples without guidance);
3. for a checkpoint main_fractalgen.py trained (it has 'train_state' or 'config'): the
   training run's own --cfg / --temperature / ... where it set them, then the sampling
   settings of the user's own JSON configuration, then neutral cfg 1 / temperature 1: a
   named model's defaults were tuned on other data (ImageNet, or the quick start's toy
   shapes) and are not inherited;
4. the model's defaults: its configuration record's 'sampling' (the named models':
   models.DEFAULT_SAMPLING, the official evaluation settings for the official five);
5. the official API's: cfg 1, linear schedule, temperature 1, filter 1e-4 and
   min(patches, 64) iterations per level.

Each source is a plain JSON dict whose "by" names it (BY_*); a sweep's also holds its
FID, image count, reference and the checkpoint position it measured. `describe` writes
settings and sources as one line; `sweep_note` is the one line that says when a sweep
would pick better settings.
"""
import json
import os

BY_CALLER, BY_SWEEP, BY_QUICKSTART, BY_ONE_CLASS = "caller", "sweep", "quick start", "one class"
BY_CHECKPOINT = "checkpoint"    # stored without a record of who chose them
BY_TRAINING = "training run"    # the flags of the run that trained the checkpoint
BY_NEUTRAL = "neutral"          # a trained checkpoint whose model's defaults were tuned on other data
BY_MODEL = "model"              # the configuration record's defaults
BY_API = "official API"
BY_SET = "set on the model"     # model.sampling_defaults assigned without sources
BY_FOLDER = "Hub folder"        # a Hub folder's config.json without a record of who chose them
NEUTRAL = {"cfg": 1.0, "temperature": 1.0}
TUNED_KEYS = ("cfg", "temperature")  # the data-dependent ones, which a sweep measures
# the order settings are shown in
SHOW_ORDER = ("cfg", "temperature", "num_iter_list", "cfg_schedule", "filter_threshold")


def layers(record_sampling=None, name=None, stored=None, stored_source=None, trained=False, run_flags=None,
           user_record=False):
    """The ordered (settings, source) pairs of a model's defaults, first match wins (the
    caller's values come on top of these, the official API's below them).

    record_sampling: the configuration record's 'sampling'; name: the model's name;
    stored / stored_source: the checkpoint's 'sampling' and 'sampling_source'; trained:
    main_fractalgen.py trained the checkpoint; run_flags: the training run's sampling
    flags that were set; user_record: the record is the user's own (a JSON file), not a
    row of the table of named models."""
    out = []
    if stored:
        out.append((dict(stored), dict(stored_source) if isinstance(stored_source, dict) else {"by": BY_CHECKPOINT}))
    record = (dict(record_sampling or {}), {"by": BY_MODEL, "model": name})
    if trained:
        if run_flags:
            out.append((dict(run_flags), {"by": BY_TRAINING}))
        if user_record:
            out.append(record)
        out.append((dict(NEUTRAL), {"by": BY_NEUTRAL, "model": name}))
    if not (trained and user_record):
        out.append(record)
    return out


def resolve(pairs):
    """(settings, sources): for each key the value and the source of the first pair that
    has it (None values do not count)."""
    settings, sources = {}, {}
    for values, source in pairs:
        for key, value in values.items():
            if value is not None and key not in settings:
                settings[key] = tuple(value) if isinstance(value, list) else value
                sources[key] = source
    return settings, sources


def format_fid(value):
    """Two decimals, or four significant digits below 1 (small feature scales)."""
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"


def format_value(key, value):
    if key == "num_iter_list":
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def label(source):
    """What a source says in a sentence: 'sweep, FID 12.30 on 500 images', 'given', ..."""
    by = source.get("by")
    if by == BY_SWEEP:
        parts = ["sweep"]
        if source.get("fid") is not None:
            parts.append(f"FID {format_fid(source['fid'])} on {source.get('num_images', '?')} images"
                         + (f" with the Inception weights {os.path.basename(source['inception_weights'])}"
                            if source.get("inception_weights") else ""))
        if source.get("earlier_weights"):
            parts.append(f"measured on the weights of epoch {source.get('epoch')}"
                         + (f", step {source['step']}" if source.get("step") else ""))
        return ", ".join(parts)
    if by == BY_MODEL:
        return f"{source['model']}'s defaults" if source.get("model") else "the model's defaults"
    return {BY_CALLER: "given", BY_QUICKSTART: "stored by the quick start", BY_ONE_CLASS: "one class: no guidance",
            BY_CHECKPOINT: "stored with the checkpoint", BY_TRAINING: "the training run's flags",
            BY_NEUTRAL: "neutral: not tuned for this checkpoint", BY_API: "official API default",
            BY_SET: "set on the model", BY_FOLDER: "stored in the Hub folder"}.get(by, str(by))


def describe(settings, sources):
    """One line: the settings, each group followed by where it came from, e.g.
    'cfg 2, temperature 1 (sweep, FID 12.30 on 500 images); num_iter_list 16,16, ...
    (fractalmar_tiny's defaults)'."""
    groups = {}  # source (as JSON) -> keys, in order of first appearance
    for key in SHOW_ORDER:
        if key in settings:
            groups.setdefault(json.dumps(sources[key], sort_keys=True, default=str), []).append(key)
    return "; ".join(", ".join(f"{key} {format_value(key, settings[key])}" for key in keys)
                     + f" ({label(json.loads(source))})" for source, keys in groups.items())


def sweep_note(sources, checkpoint=None):
    """One line when the cfg or temperature of a checkpoint was not measured for its
    weights (neutral, the training run's flags, or a sweep of earlier weights), saying
    that a sweep picks better ones; None otherwise (given, measured, the quick start's,
    the official settings)."""
    tuned = [sources[key] for key in TUNED_KEYS if key in sources]
    command = (f"python -m util.sweep --resume {checkpoint or 'CHECKPOINT'} --data_path DATA "
               f"--cfg 1,2,3 --temperature 0.9,1,1.1 --store")
    if any(s.get("by") in (BY_NEUTRAL, BY_TRAINING) for s in tuned):
        return (f"note: cfg and temperature were not measured for this checkpoint; `{command}` picks better ones "
                f"(docs/sweep.md)")
    earlier = [s for s in tuned if s.get("by") == BY_SWEEP and s.get("earlier_weights")]
    if earlier:
        return (f"note: the sweep that chose cfg and temperature measured the weights of epoch "
                f"{earlier[0].get('epoch')}, not these; `{command}` measures them again (docs/sweep.md)")
    return None


def position(ckpt):
    """(epoch, step) of a checkpoint: its 'epoch' (the last finished one) and, for a
    checkpoint written mid-epoch, the steps done in the next ('train_state')."""
    state = ckpt.get("train_state") or {}
    return ckpt.get("epoch"), state.get("step", 0) if isinstance(state, dict) else 0
