#!/bin/bash

set -e
set -x
qgraphFile=$1
butlerConfig=$2
butler --long-log --log-level=VERBOSE aggregate-graph ${qgraphFile} ${butlerConfig} -j 1 --register-dataset-types --update-output-chain 
