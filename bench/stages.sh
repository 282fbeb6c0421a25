# Sourced by bench/gpu_checks.sh and bench/gpu_end_to_end.sh: run their stages under one deadline, and pack what the
# stages wrote so that the device tool brings all of it back.
#
# That tool returns at most 8 files from $OUT (no deeper than two folders, named in letters, digits, '.', '_', '-'),
# and one GPU run writes about twenty. So the stages write into a work folder laid out like bench/results/
# (<gpu>/..., logit_std4/<gpu>/...), and after every stage that folder is packed into the one file OUT/<name>.tar.gz;
# commit a run with `tar -xzf <name>.tar.gz -C bench/results`. A command killed at the device's limit still brings
# back what its finished stages wrote.
#
#   source bench/stages.sh
#   stages_begin "$OUT" gpu_checks 540     # sets $work and $gpu (the results folder's name: NVIDIA_H200, or cpu)
#   stage 100 logs/x.log python3 bench/x.py --out "$work"   # at most 100 s and never past the deadline
#   stages_end                              # the exit status: 0 when every stage succeeded in time

stages_begin() {  # OUT NAME BUDGET_S (seconds, from when the GPU is named, that every stage must end within)
    stages_out=$1 stages_name=$2 stages_status=0
    mkdir -p "$stages_out" || return 1
    work=$(mktemp -d) || return 1
    gpu=$(python3 "$(dirname "${BASH_SOURCE[0]}")/harness.py") || { echo "stages: no torch to name the GPU" >&2; return 1; }
    mkdir -p "$work/$gpu/logs"
    stages_deadline=$((SECONDS + $3))
}

stage() {  # LIMIT_S LOG COMMAND...: run COMMAND, its output to the terminal and to $work/$gpu/LOG, then pack
    local limit=$1 log="$work/$gpu/$2" left=$((stages_deadline - SECONDS))
    shift 2
    if ((left < limit)); then limit=$left; fi
    if ((limit <= 0)); then
        echo "stages: the deadline has passed; not run: $*" | tee "$log"
        stages_status=1
        stages_pack
        return
    fi
    timeout "$limit" "$@" 2>&1 | tee "$log"
    local code=${PIPESTATUS[0]}
    if ((code == 124)); then echo "stages: stopped at its limit of $limit s: $*" | tee -a "$log"; fi
    if ((code != 0)); then stages_status=1; fi
    stages_pack
}

stages_pack() {  # $work -> OUT/NAME.tar.gz, replaced whole (never half written)
    tar -czf "$stages_out/$stages_name.tar.gz.part" -C "$work" . \
        && mv -f "$stages_out/$stages_name.tar.gz.part" "$stages_out/$stages_name.tar.gz" \
        || { echo "stages: could not pack $work into $stages_out" >&2; stages_status=1; }
}

stages_end() {  # prints where the results are and returns the status
    echo "stages: $stages_name: $( ((stages_status == 0)) && echo all stages succeeded || echo some stages failed);" \
        "results in $stages_out/$stages_name.tar.gz (tar -xzf it -C bench/results), made in $work"
    return "$stages_status"
}
