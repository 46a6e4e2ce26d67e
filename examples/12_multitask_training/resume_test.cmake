# example.12_multitask_training.resume: checkpoints, a write error mid-run
# and --resume, end to end (cmake -DEXE=<example> -DDIR=<scratch> -P this).
#
#   straight   40 steps, no interruption
#   part 1     --stop-after 20: checkpoint at step 20
#   part 2     --resume --stop-after 30 with the file size limited (ulimit -f,
#              which binds root too, and SIGXFSZ ignored so that write(2)
#              fails with EFBIG: a full disk, simulated portably): every
#              checkpoint write fails. The run must report it with the OS's
#              reason, keep training, exit 3 and leave step 20's checkpoint
#              whole and no temporary behind.
#   part 3     --resume to 40, from step 20 (the steps 20-29 logged by part 2
#              are dropped from the metrics)
# The final checkpoint must equal the straight run's, byte for byte.
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE "${DIR}")
set(common --quick --steps 40 --checkpoint-every 10)

function(run_example expected_code out_var)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT code STREQUAL expected_code)
    message(FATAL_ERROR "${ARGN}\nexited with ${code}, expected ${expected_code}\n${out}\n${err}")
  endif()
  set(${out_var} "${out}\n${err}" PARENT_SCOPE)
endfunction()

run_example(0 out "${EXE}" ${common} --stop-after 40 --out "${DIR}/straight")
run_example(0 out "${EXE}" ${common} --stop-after 20 --out "${DIR}/parts")
file(COPY_FILE "${DIR}/parts/checkpoint.safetensors" "${DIR}/step20.safetensors")

# About 500 KiB per file: the metrics logs fit, a checkpoint does not.
run_example(3 out sh -c "ulimit -f 1000 && trap '' XFSZ && exec \"$0\" \"$@\"" "${EXE}" ${common} --resume
            --stop-after 30 --out "${DIR}/parts")
foreach(needle "resumed from" "at step 20" "checkpoint after step 30 not written"
               "File too large" "still holds step 20")
  string(FIND "${out}" "${needle}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "part 2 did not say '${needle}':\n${out}")
  endif()
endforeach()
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files "${DIR}/step20.safetensors"
                        "${DIR}/parts/checkpoint.safetensors" RESULT_VARIABLE differ)
if(differ)
  message(FATAL_ERROR "the failed writes changed the last good checkpoint")
endif()
file(GLOB left "${DIR}/parts/.*tmp*")
if(left)
  message(FATAL_ERROR "temporaries left behind: ${left}")
endif()

run_example(0 out "${EXE}" ${common} --resume --stop-after 40 --out "${DIR}/parts")
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files "${DIR}/straight/checkpoint.safetensors"
                        "${DIR}/parts/checkpoint.safetensors" RESULT_VARIABLE differ)
if(differ)
  message(FATAL_ERROR "the resumed run's checkpoint differs from the straight run's")
endif()
# The metrics hold each of the 40 steps once.
file(STRINGS "${DIR}/parts/metrics.jsonl" lines REGEX "\"split\":\"train\"")
list(LENGTH lines n)
if(NOT n EQUAL 40)
  message(FATAL_ERROR "metrics.jsonl holds ${n} training records, expected 40")
endif()
message(STATUS "straight and resumed runs agree bit for bit; the write error kept step 20")
