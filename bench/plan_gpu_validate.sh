set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax; print(jax.__version__, jax.devices())"
V="model.num_hidden_layers=3 model.first_k_dense_replace=1 model.n_routed_experts=16 train.batch_ramp_start=null data.seq_len=4096 model.attention_impl=xla train.precision=bf16"
for gb in "train.global_batch_size=1" "train.global_batch_size=2 train.micro_batch_size=1" "train.global_batch_size=2"; do
  echo "=== $gb"
  tag=$(echo $gb | tr -dc 'a-z0-9' | tail -c 12)
  timeout 280 python3 -m sharding.plan --config configs/deepseek_v3_671b.yaml --mesh pipeline=1,expert=1,data=1 --lower $V $gb --json $OUT/val_$tag.json 2>&1 | grep -v "^W1\|^I0" | sed -n '1,16p;/Lowered/,$p'
done
