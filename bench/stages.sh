# Sourced by bench/gpu_checks.sh and bench/gpu_end_to_end.sh: run their stages under one deadline, and pack what the
# stages wrote so that the device tool brings all of it back.
#
# That tool returns at most 8 files from $OUT (no deeper than two folders, named in letters, digits, '.', '_', '-'),
# and one GPU run writes about twenty. So the stages write into a work folder laid out like bench/results/
# (<gpu>/..., logit_std4/<gpu>/...), packed into the one file OUT/<name>.tar.gz after every stage and every 30 s
# during one; commit a run with `tar -xzf <name>.tar.gz -C bench/results`. A command killed at the device's limit
# still brings back what its stages wrote up to the last pack.
#
# The deadline counts from the start of the device command (the age of the shell that ran setup.sh and then the
# script, unless that is older than the budget, as a terminal is; RUN_STARTED_AT, in epoch seconds, overrides),
# since that is what the device's limit counts from.
#
#   source bench/stages.sh
#   stages_begin "$OUT" gpu_checks 565     # sets $work and $gpu (the results folder's name: NVIDIA_H200, or cpu)
#   stage 100 logs/x.log python3 bench/x.py --out "$work"   # at most 100 s and never past the deadline
#   stages_end                              # the exit status: 0 when every stage succeeded in time

stages_begin() {  # OUT NAME BUDGET_S (seconds from the start of the command that every stage must end within)
    stages_out=$1 stages_name=$2 stages_status=0
    local age
    if [[ -n ${RUN_STARTED_AT:-} ]]; then
        age=$(($(date +%s) - RUN_STARTED_AT))
    else
        age=$(ps -o etimes= -p "$PPID" 2>/dev/null) || age=30
        # a parent older than the budget is no device command's shell (a terminal, say): count from now
        if ((${age:-30} > $3)); then age=0; fi
    fi
    stages_deadline=$((SECONDS + $3 - ${age:-30}))
    mkdir -p "$stages_out" || return 1
    work=$(mktemp -d) && chmod 755 "$work" || return 1  # the archive's ./ entry: extracting it sets bench/results' mode
    gpu=$(python3 "$(dirname "${BASH_SOURCE[0]}")/harness.py") || { echo "stages: no torch to name the GPU" >&2; return 1; }
    mkdir -p "$work/$gpu/logs"
}

stage() {  # LIMIT_S LOG COMMAND...: run COMMAND, its output to the terminal and to $work/$gpu/LOG, then pack
    local limit=$1 log="$work/$gpu/$2" left=$((stages_deadline - SECONDS)) packer code
    shift 2
    if ((left < limit)); then limit=$left; fi
    if ((limit <= 0)); then
        echo "stages: the deadline has passed; not run: $*" | tee "$log"
        stages_status=1
        stages_pack
        return
    fi
    set -m  # the packer gets its own process group, so that stopping it stops a tar in flight too
    (while sleep "${STAGES_PACK_EVERY_S:-30}"; do stages_pack background; done) &
    packer=$!
    set +m
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"  # -k: a stage that ignores SIGTERM is killed 10 s later
    code=${PIPESTATUS[0]}
    kill -- "-$packer" 2>/dev/null
    wait "$packer" 2>/dev/null
    rm -f "$stages_out/$stages_name.tar.gz.background"
    if ((code == 124 || code == 137)); then echo "stages: stopped at its limit of $limit s: $*" | tee -a "$log"; fi
    if ((code != 0)); then stages_status=1; fi
    stages_pack
}

stages_pack() {  # [background]: $work -> OUT/NAME.tar.gz, replaced whole (never half written)
    local archive="$stages_out/$stages_name.tar.gz" part="$stages_out/$stages_name.tar.gz.${1:-part}"
    if [[ -n ${1:-} ]]; then  # while a stage writes: tar's "file changed as we read it" (1) still packs the rest
        tar -czf "$part" -C "$work" . 2>/dev/null
        (($? <= 1)) && mv -f "$part" "$archive"
        return 0
    fi
    tar -czf "$part" -C "$work" . && mv -f "$part" "$archive" \
        || { echo "stages: could not pack $work into $stages_out" >&2; stages_status=1; }
}

stages_end() {  # prints where the results are and returns the status
    echo "stages: $stages_name: $( ((stages_status == 0)) && echo all stages succeeded || echo some stages failed);" \
        "results in $stages_out/$stages_name.tar.gz (tar -xzf it -C bench/results), made in $work"
    return "$stages_status"
}
