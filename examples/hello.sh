#!/bin/sh
#SWM name hello
#SWM cpus 1
#SWM mem 64M
#SWM walltime 00:01:00
#SWM input-files greeting.txt
echo "Hello from Sky Port job $SKYPORT_JOB_ID on $(hostname), running as $(id -un)"
echo "The input file says: $(cat greeting.txt)"
