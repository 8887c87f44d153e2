# Configures, builds and runs tests/consumer against an installed prefix (called by CTest).
file(REMOVE_RECURSE ${BINARY})
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE} -B ${BINARY} -G ${GENERATOR}
                        -DCMAKE_PREFIX_PATH=${PREFIX} -DCMAKE_BUILD_TYPE=Release
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the consumer failed: ${rc}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BINARY} RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer failed: ${rc}")
endif()
# PROGRAMS: the executables to run (default: consumer).
if(NOT PROGRAMS)
  set(PROGRAMS consumer)
endif()
foreach(program IN LISTS PROGRAMS)
  execute_process(COMMAND ${BINARY}/${program} RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "the consumer ${program} failed: ${rc}")
  endif()
endforeach()
